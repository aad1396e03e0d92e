import numpy as np
from PIL import Image

from sam4mllm.viz import IGNORED, NEGATIVE, PALETTE, POSITIVE, display_scale, overlay, save_overlay, side_by_side


def test_overlay_tints_masks_outlines_them_and_marks_points(tmp_path):
    img = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:15] = True
    out = np.asarray(overlay(img, masks=[mask], points=[[25, 2], [25, 17]], labels=[1, 0], alpha=0.5))
    assert out[10, 10].tolist() == [round(0.5 * 100 + 0.5 * c) for c in PALETTE[0]]  # interior tinted
    assert out[5, 10].tolist() == list(PALETTE[0])                                     # edge outlined
    assert out[10, 20].tolist() == [100, 100, 100]                                     # outside untouched
    assert tuple(out[2, 25]) == POSITIVE and tuple(out[17, 25]) == NEGATIVE


def test_overlay_box_and_scale(tmp_path):
    img = np.zeros((10, 10, 3), np.uint8)
    out = np.asarray(overlay(img, boxes=[[2, 3, 6, 8]], scale=2))
    assert out.shape == (20, 20, 3)
    assert tuple(out[6, 4]) == PALETTE[0] and tuple(out[6 + 9, 4 + 5]) == PALETTE[0]
    assert out[10, 8].tolist() == [0, 0, 0]  # inside the outline: untouched


def test_save_overlay_writes_the_overlay_losslessly_creating_folders(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    p = save_overlay(tmp_path / "a/b.png", img, masks=[mask], scale=2)
    with Image.open(p) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved), np.asarray(overlay(img, masks=[mask], scale=2)))


def test_side_by_side_puts_panels_in_a_row_under_their_caption():
    a, b = Image.new("RGB", (5, 4), (10, 20, 30)), Image.new("RGB", (3, 6), (40, 50, 60))
    out = np.asarray(side_by_side([a, b], caption="x", gap=2))
    assert out.shape == (14 + 6, 5 + 2 + 3, 3)
    assert (out[14:18, :5] == (10, 20, 30)).all() and (out[18:, :5] == 255).all()  # a, white below it
    assert (out[14:, 5:7] == 255).all() and (out[14:, 7:] == (40, 50, 60)).all()   # the gap, then b
    assert (out[:14] != 255).any()                                                  # the caption
    assert np.asarray(side_by_side([a, b], gap=2)).shape == (6, 10, 3)               # no caption, no strip


def test_overlay_tints_ignored_pixels_grey_under_the_masks():
    img = np.full((6, 6, 3), 100, np.uint8)
    ignore, mask = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    ignore[:, :3] = True
    mask[1:5, 1:5] = True
    out = np.asarray(overlay(img, masks=[mask], ignore=ignore, alpha=0.5))
    grey = [0.5 * 100 + 0.5 * c for c in IGNORED]
    assert out[0, 0].tolist() == [round(v) for v in grey]                            # ignored only
    assert out[2, 2].tolist() == [round(0.5 * g + 0.5 * c) for g, c in zip(grey, PALETTE[0], strict=True)]
    assert out[2, 3].tolist() == [round(0.5 * 100 + 0.5 * c) for c in PALETTE[0]]  # mask only
    assert out[0, 4].tolist() == [100, 100, 100]                                       # neither


def test_small_images_are_enlarged_to_about_400_pixels_and_photos_drawn_as_they_are():
    assert [display_scale((h, w)) for h, w in [(100, 100), (480, 640), (10, 12), (150, 200), (900, 1200)]] == \
           [4, 1, 33, 2, 1]
    assert display_scale((100, 100, 3), side=512) == 5  # predict.py's single panel; a colour image's shape


def test_points_and_box_lines_stay_visible_on_a_photo_drawn_as_it_is():
    photo = np.zeros((480, 640, 3), np.uint8)
    out = np.asarray(overlay(photo, boxes=[[100, 100, 300, 300]], points=[[400, 200]], labels=[1]))
    assert (out[200, 400 - 3:400 + 4] == POSITIVE).all()   # a 4-px radius, not 2
    assert (out[150, 100:102] == PALETTE[0]).all() and not (out[150, 102] == PALETTE[0]).all()  # a 2-px line
