"""PPG's 64-group SAM filter: one cached image embedding vs re-encoding the image per group.

    python bench/sam_filter.py [--reencode-groups 64]

A random-init segment_anything SAM of ViT-B shape (93.7 M parameters) stands in for a
real checkpoint (none can be downloaded here); speed does not depend on the weights.
Re-encoding costs one full image encoder pass per group, so by default it is measured
on the first 4 groups and the 64-group time is extrapolated; both paths' IoUs are
compared on the groups that both ran. Then: PPG labels per second with the offline
GrabCut backend over the synthetic train split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.labels import ppg_label
from sam4mllm.metrics import score_sample
from sam4mllm.sam.grabcut import GrabCutSegmenter
from sam4mllm.sam.sam_family import build_segment_anything


def _groups(mask: np.ndarray, box: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    bx1, by1, bx2, by2 = box.astype(int)
    nys, nxs = np.nonzero(~mask[by1:by2, bx1:bx2])
    pos = rng.integers(len(xs), size=(n, 2))
    neg = rng.integers(len(nxs), size=n)
    pts = np.concatenate([np.stack([xs[pos], ys[pos]], -1), np.stack([nxs[neg] + bx1, nys[neg] + by1], -1)[:, None]], 1)
    return pts.astype(float), np.tile([1, 1, 0], (n, 1))


def filter_speed(reencode_groups: int, sample) -> None:
    torch.manual_seed(0)
    seg = build_segment_anything("vit_b", allow_random_init=True)
    n_params = sum(p.numel() for p in seg.model.parameters()) / 1e6
    mask, box = sample.masks[0], sample.boxes[0]
    pts, lab = _groups(mask, box, np.random.default_rng(0), 64)
    boxes = np.repeat(box[None], 64, 0)

    t0 = time.perf_counter()
    seg.set_image(sample.image)
    cached = seg.predict(boxes, pts, lab)
    t_cached = time.perf_counter() - t0
    iou_cached = [score_sample(m, mask).iou for m in cached.masks]

    t0 = time.perf_counter()
    iou_naive = []
    for g in range(reencode_groups):  # the naive loop: encode the image again for every group
        seg.predictor.set_image(sample.image)
        m, s, _ = seg.predictor.predict(point_coords=pts[g], point_labels=lab[g], box=box, multimask_output=True)
        iou_naive.append(score_sample(m[s.argmax()], mask).iou)
    per_group = (time.perf_counter() - t0) / reencode_groups
    t_naive = per_group * 64
    equal = np.allclose(iou_naive, iou_cached[:reencode_groups], atol=0)
    print(f"SAM ViT-B shape, random init ({n_params:.1f} M params), CPU, image {sample.image.shape[1]}x"
          f"{sample.image.shape[0]} -> 1024")
    print("| path | 64 groups (s) | per group (s) |")
    print("|------|---------------|---------------|")
    print(f"| cached embedding, one batch | {t_cached:.2f} | {t_cached / 64:.3f} |")
    note = "" if reencode_groups == 64 else f" (measured on {reencode_groups}, extrapolated)"
    print(f"| re-encode per group{note} | {t_naive:.2f} | {per_group:.3f} |")
    print(f"speed-up: {t_naive / t_cached:.1f}x   IoUs equal on the {reencode_groups} shared groups: {equal}")


def offline_label_speed(root: Path) -> None:
    ds = ReferDataset(root / "refer_seg", "refcoco", "train", root / "coco/train2014")
    seg, rng = GrabCutSegmenter(), np.random.default_rng(0)
    by_image: dict[int, list[int]] = {}
    for i, r in enumerate(ds.records):
        by_image.setdefault(r["image_id"], []).append(i)
    n_targets, ious = 0, []
    t0 = time.perf_counter()
    for ids in by_image.values():
        seen = set()
        for i in ids:
            s = ds[i]
            key = s.meta["ann_ids"][0]
            if key in seen:
                continue
            seen.add(key)
            seg.set_image(s.image)
            ious.append(ppg_label(seg, s.masks[0], s.boxes[0], rng)["iou"])
            n_targets += 1
    dt = time.perf_counter() - t0
    print(f"\nGrabCut PPG labels (64 groups, top 16) on the synthetic train split: {len(by_image)} images, "
          f"{n_targets} targets in {dt:.1f} s = {n_targets / dt:.1f} targets/s, {64 * n_targets / dt:.0f} prompts/s; "
          f"mean chosen IoU {np.mean(ious):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reencode-groups", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(Path(tmp) / "synthetic", SyntheticConfig())
        root = Path(tmp) / "synthetic"
        sample = ReferDataset(root / "refer_seg", "refcoco", "val", root / "coco/train2014")[0]
        filter_speed(args.reencode_groups, sample)
        offline_label_speed(root)


if __name__ == "__main__":
    main()
