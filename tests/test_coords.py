import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sam4mllm.coords import Grid, ResizedPixels, mask_to_box

GRID = Grid()


def test_grid_rounds_half_up_and_clamps():
    size = (100, 200)  # H, W
    # x / W * 1000: 0.1 px -> 0.5 -> 1 (half up, not banker's 0); W -> 1000 -> clamped to 999.
    xy = np.array([[0.1, 0.05], [200.0, 100.0], [-5.0, 50.0], [0.3, 0.149]])
    assert GRID.to_model(xy, size).tolist() == [[1, 1], [999, 999], [0, 500], [2, 1]]


def test_grid_decodes_without_rounding():
    assert GRID.from_model(np.array([500, 250]), (100, 200)).tolist() == [100.0, 25.0]


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(0, 999), st.integers(0, 999))
def test_grid_integer_roundtrip(h, w, vx, vy):
    v = np.array([vx, vy])
    assert GRID.to_model(GRID.from_model(v, (h, w)), (h, w)).tolist() == [vx, vy]


@given(st.integers(1, 2000), st.integers(1, 2000), st.floats(0, 1), st.floats(0, 1))
def test_grid_pixel_error_is_at_most_half_a_bin(h, w, fx, fy):
    xy = np.array([fx * (w - 1), fy * (h - 1)])
    back = GRID.from_model(GRID.to_model(xy, (h, w)), (h, w))
    assert abs(back[0] - xy[0]) <= 0.5 * w / 1000 + 1e-9
    assert abs(back[1] - xy[1]) <= 0.5 * h / 1000 + 1e-9


def test_resized_pixels_box():
    cs = ResizedPixels(resize=lambda hw: (hw[0] // 2, hw[1] // 2))  # a processor that halves the image
    size = (480, 640)
    box = np.array([10.0, 21.0, 640.0, 480.0])
    # 10 * 0.5 = 5; 21 * 0.5 = 10.5 -> 11 (half up); right/bottom edges clamp to W'-1, H'-1.
    assert cs.to_model(box, size).tolist() == [5, 11, 319, 239]
    assert cs.from_model(np.array([5, 11, 319, 239]), size).tolist() == [10.0, 22.0, 638.0, 478.0]
    assert cs.limits(size) == (319, 239)


def test_mask_box():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert mask_to_box(m).tolist() == [3, 2, 9, 5]
    assert mask_to_box(np.zeros((4, 4), bool)).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("bins", [100, 1000])
def test_grid_limits(bins):
    assert Grid(bins).limits((5, 5)) == (bins - 1, bins - 1)
