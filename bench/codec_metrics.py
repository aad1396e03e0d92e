"""Throughput of the prompt parser and the segmentation meter (CPU).

    python bench/codec_metrics.py
"""

from __future__ import annotations

import time

import numpy as np

from sam4mllm.codec import FORMATS, Point, TargetPrompt
from sam4mllm.metrics import SegmentationMeter


def _rate(fn, arg, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn(arg)
    return n / (time.perf_counter() - t)


def main() -> None:
    target = TargetPrompt((12, 34, 567, 890), (Point(100, 200, True), Point(150, 250, True), Point(20, 40, False)))
    garbage = "".join(np.random.default_rng(0).choice(list("[](),0123456789 abc<|>"), 300))
    print("| format | parse/s (3 targets) | parse/s (300 chars of garbage) |")
    print("|--------|---------------------|--------------------------------|")
    for name, fmt in FORMATS.items():
        text = fmt.encode([target] * 3)
        print(f"| {name} | {_rate(fmt.parse, text, 2000):,.0f} | {_rate(fmt.parse, garbage, 2000):,.0f} |")
    rng = np.random.default_rng(0)
    pred, gt = rng.random((480, 640)) > 0.5, rng.random((480, 640)) > 0.5
    meter = SegmentationMeter()
    print(f"\nSegmentationMeter.update at 640x480: {_rate(lambda p: meter.update(p, gt), pred, 300):,.0f} samples/s")


if __name__ == "__main__":
    main()
