"""Sharded evaluation: whole images per shard vs sentences dealt round-robin.

    python bench/eval_sharding.py [--images 30] [--size 640 480] [--shards 1 4]

Evaluation hands each shard whole images, their sentences in a row, so an image is
decoded once to predict (once more to score) and the segmenter embeds it once. Until
2026-12-06 sentences were dealt round-robin and each decoded its own image, so an image
of k sentences was decoded 2k times and embedded in up to min(k, shards) shards. Both
paths run the real ``evaluate`` (shards one after another in this process) on the
synthetic val split at COCO-like size, with a stand-in for the MLLM that does what the
predictor does with the segmenter (embed the image; it then answers "no target"), so the
timed part is reading, embedding (GrabCut's is a colour conversion) and scoring; the
merged predictions of both are compared. A real SAM's embedding is far costlier: one
random-init segment_anything ViT-B embedding (the weights do not change its speed) is
timed on this CPU to show what the embeddings the old path repeats would cost there.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.data import refer
from sam4mllm.data.base import SegDataset
from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.evaluate import evaluate
from sam4mllm.inference import SegmentResult
from sam4mllm.sam.grabcut import GrabCutSegmenter
from sam4mllm.sam.sam_family import build_segment_anything


class Embeds:
    """The predictor's use of the segmenter, without the MLLM."""

    def __init__(self) -> None:
        self.segmenter = GrabCutSegmenter()

    def segment_many(self, items: list[tuple[np.ndarray, str, str]]) -> list[SegmentResult]:
        for image, _, _ in items:
            self.segmenter.set_image(image)
        return [SegmentResult([], np.zeros((0, 4)), text="No object found.", no_target=True) for _ in items]


def _run(data_dir: Path, out: Path, shards: int) -> tuple[float, int, int, bytes]:
    """Seconds, images decoded, images embedded, merged predictions."""
    decoded = [0]
    real = refer.load_image

    def counting(*a, **k):
        decoded[0] += 1
        return real(*a, **k)

    refer.load_image = counting
    predictor = Embeds()
    t0 = time.perf_counter()
    try:
        for i in range(shards):
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name="eval", overrides=[
                    f"paths.data_dir={data_dir}", f"out_dir={out}", "progress=false", "checkpoint=null",
                    "eval.overlays=0", f"shard.index={i}", f"shard.count={shards}"])
            evaluate(cfg, predictor)
    finally:
        refer.load_image = real
    seconds = time.perf_counter() - t0
    return seconds, decoded[0], predictor.segmenter.embed_count, (out / "predictions.jsonl").read_bytes()


def _round_robin() -> tuple[object, object]:
    """The old path: one group per sentence (so shards deal sentences), each decoding its own image."""
    old = (SegDataset.by_image, ReferDataset.load)
    SegDataset.by_image = lambda self: [(str(i), [i]) for i in range(len(self.records))]
    ReferDataset.load = lambda self, record, image=None: old[1](self, record)
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report = generate_synthetic(tmp / "synthetic", SyntheticConfig(
            width=args.size[0], height=args.size[1], images={"train": 1, "val": args.images, "testA": 1, "testB": 1}))
        n = report.counts["refcoco"]["val"]["sentences"]
        for shards in args.shards:
            new = _run(tmp, tmp / f"new{shards}", shards)
            old = _round_robin()
            try:
                was = _run(tmp, tmp / f"old{shards}", shards)
            finally:
                SegDataset.by_image, ReferDataset.load = old
            rows.append((shards, new, was))
    print(f"evaluation of synthetic val: {args.images} images of {args.size[0]}x{args.size[1]} (PNG), {n} sentences")
    print("| shards | path | decodes | embeddings | seconds |")
    print("|--------|------|---------|------------|---------|")
    for shards, new, was in rows:
        for name, r in (("whole images", new), ("round-robin (old)", was)):
            print(f"| {shards} | {name} | {r[1]} | {r[2]} | {r[0]:.2f} |")
    for shards, new, was in rows:
        print(f"{shards} shard(s): {was[2] / new[2]:.1f}x the embeddings and {was[1] / new[1]:.1f}x the decodes on the "
              f"old path, {was[0] / new[0]:.1f}x the time; same predictions: {new[3] == was[3]}")
    sam = build_segment_anything("vit_b", allow_random_init=True, device="cpu")
    image = (np.random.default_rng(0).random((args.size[1], args.size[0], 3)) * 255).astype(np.uint8)
    t0 = time.perf_counter()
    sam.set_image(image)
    t_emb = time.perf_counter() - t0
    shards, new, was = rows[-1]
    print(f"segment_anything ViT-B, one embedding on this CPU: {t_emb:.2f} s; at {shards} shards the old path's "
          f"{was[2] - new[2]} extra embeddings would take {(was[2] - new[2]) * t_emb:.0f} s more with it")


if __name__ == "__main__":
    main()
