"""PQPP's points round, fast (shared prefix, one batched forward) vs naive (one full forward per point),
and end-to-end latency of PQPP vs PPG on the same tiny model.

    python bench/pqpp_speed.py

Random-init tiny Qwen2-VL (speed does not depend on the weights). End to end, each
variant generates an answer of its realistic length -- a box (20 tokens) for PQPP
round 1, a box and 3 labelled points (53 tokens) for PPG -- then PQPP scores a 5x5 grid
and both call the GrabCut segmenter with box + points.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        generate_synthetic(root, SyntheticConfig(images={"val": 2}, reason_images={}))
        sample = ReferDataset(root / "refer_seg", "refcoco", "val", root / "coco/train2014")[0]
        adapter = build_adapter("qwen2vl", str(Path(tmp) / "tiny"), tiny={})
    image, size = sample.image, sample.size
    seg = GrabCutSegmenter()
    pqpp = Sam4MLLM(adapter, seg, "pqpp", max_new_tokens=20, min_new_tokens=20)
    ppg = Sam4MLLM(adapter, seg, "ppg", max_new_tokens=53, min_new_tokens=53)
    box_px = sample.boxes[0]
    box = tuple(int(v) for v in adapter.coord_system().to_model(box_px, size))
    pts_px = sample_points(box_px, size, PQPPConfig(), np.random.default_rng(0))
    pts = adapter.coord_system().to_model(pts_px.astype(float), size)
    questions = [point_question(adapter.fmt, box, Point(int(x), int(y))) for x, y in pts]
    prefix = pqpp.prefix_from_dialog(Dialog([(box_question(sample.expression, "res"),
                                              adapter.fmt.encode([TargetPrompt(box)]))]), image)
    fast = pqpp.score_points(prefix, questions, fast=True)
    slow = pqpp.score_points(prefix, questions, fast=False)
    diff = max(np.abs(fast[0] - slow[0]).max(), np.abs(fast[1] - slow[1]).max())
    t_fast = _median_ms(lambda: pqpp.score_points(prefix, questions, fast=True))
    t_slow = _median_ms(lambda: pqpp.score_points(prefix, questions, fast=False), n=3)
    print("| points round, 25 points | ms | ")
    print("|---|---|")
    print(f"| naive: 25 full forwards | {t_slow:.1f} |")
    print(f"| fast: one batched forward over the cached prefix | {t_fast:.1f} |")
    print(f"speed-up {t_slow / t_fast:.1f}x; max |P_fast - P_naive| = {diff:.2e}")

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
