"""PQPP's points round, fast (shared prefix, one packed forward) vs naive (one full forward per point),
and end-to-end latency of PQPP vs PPG on the same tiny model.

    python bench/pqpp_speed.py

Random-init tiny Qwen2-VL (speed does not depend on the weights). End to end, each
variant generates an answer of its realistic length -- a box (20 tokens) for PQPP
round 1, a box and 3 labelled points (53 tokens) for PPG -- then PQPP scores a 5x5 grid
and both call the GrabCut segmenter with box + points.

The points round is also timed for larger images (more image tokens in the prefix):
the fast path computes the box's shared question text once and each point's own tokens,
while the naive path reruns the vision encoder, the prefix and the whole question per
point, so the ratio grows with the prefix.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sam4mllm.codec import Point, TargetPrompt
from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.dialogs import Dialog, box_question, point_question
from sam4mllm.inference import PQPPConfig, Sam4MLLM, sample_points
from sam4mllm.models import build_adapter
from sam4mllm.sam.grabcut import GrabCutSegmenter


def _median_ms(fn, n: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _setup(tmp: Path, side: int) -> tuple[Any, Any]:
    """A synthetic val sample of ``side`` x ``side`` pixels and a tiny model that keeps that resolution."""
    root = tmp / f"synthetic_{side}"
    generate_synthetic(root, SyntheticConfig(width=side, height=side, images={"val": 2}, reason_images={}))
    sample = ReferDataset(root / "refer_seg", "refcoco", "val", root / "coco/train2014")[0]
    return sample, build_adapter("qwen2vl", str(tmp / f"tiny_{side}"), tiny={"image_pixels": side * side})


def grid_questions(adapter: Any, sample: Any) -> tuple[tuple[int, ...], np.ndarray, list[str]]:
    """The GT box in model units, a 5x5 grid in it (pixels) and the 25 point questions."""
    cs, size = adapter.coord_system(), sample.size
    pts_px = sample_points(sample.boxes[0], size, PQPPConfig(), np.random.default_rng(0))
    box = tuple(int(v) for v in cs.to_model(sample.boxes[0], size))
    pts = cs.to_model(pts_px.astype(float), size)
    return box, pts_px, [point_question(adapter.fmt, box, Point(int(x), int(y))) for x, y in pts]


def points_round(pqpp: Sam4MLLM, sample: Any) -> tuple[int, int, int, float, float, float]:
    """``(prefix, shared, per-point tokens, naive ms, fast ms, max |dP|)`` for a 5x5 grid in the GT box."""
    adapter = pqpp.adapter
    box, _, questions = grid_questions(adapter, sample)
    prefix = pqpp.prefix_from_dialog(Dialog([(box_question(sample.expression, "res"),
                                              adapter.fmt.encode([TargetPrompt(box)]))]), sample.image)
    fast = pqpp.score_points(prefix, questions, fast=True)
    slow = pqpp.score_points(prefix, questions, fast=False)
    diff = max(np.abs(fast[0] - slow[0]).max(), np.abs(fast[1] - slow[1]).max())
    shared, conts = pqpp._continuations(prefix, questions, len(prefix.ids))
    t_fast = _median_ms(lambda: pqpp.score_points(prefix, questions, fast=True))
    t_slow = _median_ms(lambda: pqpp.score_points(prefix, questions, fast=False), n=3)
    return len(prefix.ids), len(shared), max(map(len, conts)), t_slow, t_fast, diff


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        setups = {side: _setup(Path(tmp), side) for side in (112, 224, 448)}
    sample, adapter = setups[112]
    image = sample.image
    seg = GrabCutSegmenter()
    pqpp = Sam4MLLM(adapter, seg, "pqpp", max_new_tokens=20, min_new_tokens=20)
    ppg = Sam4MLLM(adapter, seg, "ppg", max_new_tokens=53, min_new_tokens=53)
    print("| points round, 25 points | prefix tokens | shared question tokens | per-point tokens | naive ms | "
          "fast ms | speed-up | max dP |")
    print("|---|---|---|---|---|---|---|---|")
    for side, (s, a) in setups.items():
        n_prefix, n_shared, n_point, t_slow, t_fast, diff = points_round(Sam4MLLM(a, seg, "pqpp"), s)
        default = " (the test model)" if side == 112 else ""
        print(f"| {side}x{side} image{default} | {n_prefix} | {n_shared} | {n_point} | {t_slow:.1f} | {t_fast:.1f} | "
              f"{t_slow / t_fast:.1f}x | {diff:.1e} |")

    box_px = sample.boxes[0]
    _, pts_px, questions = grid_questions(adapter, sample)

    seg.set_image(image)
    labels = np.array([[1] * 12 + [0] * 13])

    def run_pqpp() -> None:
        _, pre = pqpp.generate(box_question(sample.expression, "res"), image, keep_cache=True)
        pqpp.score_points(pre, questions, fast=True)
        seg.predict(box_px[None], pts_px[None].astype(float), labels)

    def run_ppg() -> None:
        ppg.generate(box_question(sample.expression, "res"), image)
        seg.predict(box_px[None], pts_px[None, :3].astype(float), np.array([[1, 1, 0]]))

    t_pqpp, t_ppg = _median_ms(run_pqpp), _median_ms(run_ppg)
    print("\n| end to end (tiny Qwen2-VL, GrabCut) | ms |")
    print("|---|---|")
    print(f"| PPG: 53-token answer + segmenter | {t_ppg:.1f} |")
    print(f"| PQPP: 20-token box + 25 points (fast) + segmenter | {t_pqpp:.1f} |")
    print(f"PQPP / PPG = {t_pqpp / t_ppg:.2f}")


if __name__ == "__main__":
    main()
