import numpy as np
import pytest

from sam4mllm.metrics import SegmentationMeter, VQAMeter, normalize_vqa_answer, score_sample, vqa_accuracy


def m(rows: list[str]) -> np.ndarray:
    """A mask from strings: '#' is True."""
    return np.array([[c == "#" for c in r] for r in rows])


E = m(["....", "...."])  # empty 2x4


def test_plain_iou():
    s = score_sample(m(["##..", "##.."]), m([".##.", ".##."]))
    assert (s.intersection, s.union) == (2, 6) and s.iou == pytest.approx(1 / 3)


def test_ciou_and_giou_differ_as_defined():
    meter = SegmentationMeter()
    meter.update(m(["##..", "...."]), m(["#...", "...."]))  # I=1 U=2 -> 0.5
    meter.update(m(["####", "####"]), m(["####", "###."]))  # I=7 U=8 -> 0.875
    r = meter.compute()
    assert r["cIoU"] == pytest.approx(8 / 10)
    assert r["gIoU"] == pytest.approx((0.5 + 0.875) / 2)
    assert r["Pr@0.7"] == 0.5 and r["Pr@0.9"] == 0.0
    assert r["N-acc"] is None and r["T-acc"] == 1.0


def test_gres_rules():
    meter = SegmentationMeter()
    # 1. no-target, predicted no-target: IoU 1, adds nothing to the sums.
    a = meter.update(None, E)
    # 2. no-target, predicted a mask of 3 px: IoU 0, adds 3 to sum(U).
    b = meter.update(m(["###.", "...."]), E)
    # 3. target of 4 px predicted as no-target: IoU 0, adds 0 to sum(I) and 4 to sum(U).
    c = meter.update(None, m(["##..", "##.."]))
    # 4. target hit exactly: I=U=2.
    d = meter.update(m(["#...", "#..."]), m(["#...", "#..."]))
    assert [x.iou for x in (a, b, c, d)] == [1.0, 0.0, 0.0, 1.0]
    r = meter.compute()
    assert r["cIoU"] == pytest.approx(2 / (0 + 3 + 4 + 2))
    assert r["gIoU"] == pytest.approx(0.5)  # averaged over all four samples, no-target included
    assert r["N-acc"] == 0.5 and r["T-acc"] == 0.5
    assert r["Pr@0.7"] == 0.5  # over the two target samples only
    assert r["n_no_target"] == 2


def test_empty_prediction_mask_counts_as_no_target_without_an_explicit_prediction():
    assert score_sample(np.zeros((2, 4), bool), E).iou == 1.0  # LISA: both empty
    assert score_sample(E, None).pred_no_target


def test_gres_reads_the_explicit_no_target_prediction_not_the_mask():
    """GRES official code: only a "no target" prediction counts as one. An empty mask from a target
    answer (a box the segmenter found nothing in) or from an unparseable answer does not."""
    meter = SegmentationMeter()
    said = meter.update(None, E, no_target=True)                 # the no-target answer
    boxed = meter.update(E, E, no_target=False)                  # a box whose mask is empty
    garbage = meter.update(None, E, valid=False, no_target=False)  # unparseable
    target_boxed = meter.update(E, m(["#...", "...."]), no_target=False)  # a target, its box's mask empty
    assert [x.iou for x in (said, boxed, garbage, target_boxed)] == [1.0, 0.0, 0.0, 0.0]
    r = meter.compute()
    assert r["N-acc"] == pytest.approx(1 / 3) and r["T-acc"] == 1.0  # the boxed target counts as a target
    assert r["gIoU"] == pytest.approx(0.25) and r["cIoU"] == 0.0
    # Without the explicit prediction the same masks score by emptiness: every no-target right, T-acc 0.
    plain = SegmentationMeter()
    for pred, gt in ((None, E), (E, E), (None, E), (E, m(["#...", "...."]))):
        plain.update(pred, gt)
    assert plain.compute()["N-acc"] == 1.0 and plain.compute()["T-acc"] == 0.0


def test_all_empty_split():
    meter = SegmentationMeter()
    meter.update(None, E)
    assert meter.compute()["cIoU"] == 1.0 and meter.compute()["T-acc"] is None


def test_ignore_pixels_leave_both_intersection_and_union():
    pred = m(["###.", "...."])
    gt = m(["##..", "##.."])
    ign = m(["..#.", "#..."])  # one false-positive pixel and one missed pixel are ignored
    s = score_sample(pred, gt, ign)
    assert (s.intersection, s.union) == (2, 3)


def test_invalid_outputs_are_counted():
    meter = SegmentationMeter()
    meter.update(None, m(["#...", "...."]), valid=False)
    meter.update(m(["#...", "...."]), m(["#...", "...."]))
    r = meter.compute()
    assert r["invalid_rate"] == 0.5 and r["gIoU"] == 0.5


def test_resolution_mismatch_raises():
    with pytest.raises(ValueError, match="original resolution"):
        score_sample(np.zeros((4, 4), bool), np.zeros((2, 2), bool))


def test_empty_meter():
    r = SegmentationMeter().compute()
    assert r["n"] == 0 and r["cIoU"] is None and r["gIoU"] is None


# ------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the red one", "red 1"),
        ("an apple.", "apple"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("3.5", "3.5"),
        ("1,000", "1000"),          # digit,digit: punctuation is removed, not spaced
        ("black-and-white", "black and white"),
        ("red - white", "red white"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_min_over_three():
    answers = ["2"] * 2 + ["3"] * 8
    # For each of the 10 answers, matches among the other 9: "2" answers see 1 other "2".
    assert vqa_accuracy("2", answers) == pytest.approx((2 * min(1, 1 / 3) + 8 * min(1, 2 / 3)) / 10)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0


def test_vqa_normalisation_only_when_humans_disagree():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # identical answers: compared verbatim
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("two", ["2"] * 9 + ["two"]) == 1.0


def test_vqa_meter_is_percent():
    meter = VQAMeter()
    meter.update("yes", ["yes"] * 10)
    meter.update("no", ["yes"] * 10)
    assert meter.compute() == {"n": 2, "accuracy": 50.0}
