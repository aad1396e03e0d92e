"""How right must PQPP's point answers be to beat its own boxes? Measured on the demo's model.

    python bench/point_accuracy.py [--demo outputs/demo] [--threshold 0.9] [--seeds 3]

Reads the demo's PQPP evaluation that kept every answer (``make demo`` writes it to
``<demo>/eval/pqpp_all/``) and re-segments its round-1 boxes, without the MLLM, with
points of a known accuracy:

* **repaired**: the answers the model keeps at ``--threshold`` (the demo's PQPP row),
  each wrong one (the GT mask disagrees at the point) set right with probability f.
  f = 0 is the demo's PQPP row, f = 1 the same points all right; in between, the share
  right that the points must reach before PQPP beats its boxes (box-only, no points).
* **noisy grid**: the 5x5 grid the model was asked about, every point kept, answered by
  the GT masks with each answer flipped with probability e. e = 0 is the demo's "PQPP
  boxes + GT point answers" row.
* **exact shape in its own box**: every asked point answered as if the object's exact
  shape filled the model's box (the GT mask at the same position relative to the GT box):
  the best a points round can do by reasoning from the box it wrote instead of reading
  the point in the image.

Last, where box-only loses its pixels: the share of its lost union (union minus
intersection, summed as cIoU sums them) that lies on target sentences it gives no box,
which no points round can win back.

Stochastic rows are averaged over ``--seeds`` draws. Without the demo's outputs it says
so and exits 0 (``make bench`` on a fresh clone), since training them is the demo's job.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sam4mllm.config import build
from sam4mllm.data import build_dataset
from sam4mllm.demo import VIEWS, compose_config
from sam4mllm.evaluate import MERGED, Prompts, confident_answers, pqpp_config, predicted_mask, resegment
from sam4mllm.inference import PQPPConfig, sample_points
from sam4mllm.metrics import SegmentationMeter
from sam4mllm.report import markdown_table
from sam4mllm.shards import read_shard

Answers = Callable[[dict[str, Any], Any, np.random.Generator], Prompts]


def repaired(threshold: float, f: float) -> Answers:
    """The model's answers above ``threshold``, each wrong one set right with probability ``f``."""
    def answers(r: dict[str, Any], s: Any, rng: np.random.Generator) -> Prompts:
        gt = s.union_mask()
        points, labels, confidences = confident_answers(r, PQPPConfig(threshold=threshold))
        for i, (p, lb) in enumerate(zip(points, labels, strict=True)):
            truth = gt[p[:, 1].astype(int), p[:, 0].astype(int)].astype(np.int64)
            labels[i] = np.where((lb != truth) & (rng.random(len(lb)) < f), truth, lb)
        return points, labels, confidences
    return answers


def noisy_grid(grid: PQPPConfig, e: float) -> Answers:
    """Every grid point of each box, answered by the GT mask and flipped with probability ``e``."""
    def answers(r: dict[str, Any], s: Any, rng: np.random.Generator) -> Prompts:
        gt = s.union_mask()
        points = [sample_points(b, s.size, grid, rng) for b in np.asarray(r["boxes"], float)]
        labels = [gt[p[:, 1], p[:, 0]].astype(np.int64) ^ (rng.random(len(p)) < e) for p in points]
        return points, labels, [np.ones(len(p)) for p in points]
    return answers


def shape_in_own_box(r: dict[str, Any], s: Any, rng: np.random.Generator) -> Prompts:
    """Every asked point answered as if the object's exact shape filled the model's own box:
    the GT mask at the same position relative to the GT box of the target it overlaps most
    (the first if none), as a points round that trusts its box would answer."""
    points, labels = [], []
    for b, p in zip(np.asarray(r["boxes"], float), r["points"], strict=True):
        p = np.asarray(p, np.int64).reshape(-1, 2)
        overlap = [np.prod(np.clip(np.minimum(b[2:], g[2:]) - np.maximum(b[:2], g[:2]), 0, None)) for g in s.boxes]
        if not overlap:  # a no-target sentence: no shape to place
            labels.append(np.zeros(len(p), np.int64))
        else:
            k = int(np.argmax(overlap))
            mask, g = s.masks[k], s.boxes[k]
            rel = (p + 0.5 - b[:2]) / (b[2:] - b[:2])
            xy = np.clip((g[:2] + rel * (g[2:] - g[:2])).astype(np.int64), 0, [mask.shape[1] - 1, mask.shape[0] - 1])
            labels.append(mask[xy[:, 1], xy[:, 0]].astype(np.int64))
        points.append(p)
    return points, labels, [np.ones(len(p)) for p in points]


def score(runs: list[tuple[dict, list, Any]], segmenter: Any, answers: Answers | None, seeds: int,
          tmp: Path) -> list[float | None]:
    """Per view, mean cIoU and share of points right (None without points) over ``seeds`` draws.

    The last draw's predictions of view ``k`` are left in ``tmp / f"view{k}"``."""
    out = []
    for k, (header, records, dataset) in enumerate(runs):
        cious, rights = [], []
        for seed in range(seeds if answers else 1):
            prompts = partial(answers, rng=np.random.default_rng(seed)) if answers else lambda r, s: ([], [], [])
            m = resegment(header, records, tmp / f"view{k}", dataset, segmenter, prompts)
            cious.append(m["cIoU"])
            rights.append(m["points_right"])
        out += [float(np.mean(cious)), float(np.mean(rights)) if rights[0] is not None else None]
    return out


def missed(box_only: Path, dataset: Any) -> tuple[float, float | None]:
    """Box-only's lost pixels (union - intersection) in its predictions folder: the share on target
    sentences given no box, and the cIoU over the sentences given one (None if none is)."""
    header, records = read_shard(box_only / MERGED)
    ds = build_dataset(dataset, header["split"])
    meters = {boxed: SegmentationMeter() for boxed in (False, True)}
    for r in records:
        s = ds[int(r["key"])]
        meters[bool(r.get("boxes"))].update(predicted_mask(r, s.size), s.union_mask(), s.ignore)
    lost = {k: sum(x.union - x.intersection for x in m.scores) for k, m in meters.items()}
    return lost[False] / max(lost[False] + lost[True], 1), meters[True].compute()["cIoU"]  # 0 / 0: nothing lost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("outputs/demo"), help="the demo's output folder")
    parser.add_argument("--threshold", type=float, default=0.9, help="the point filter of the 'repaired' rows")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    files = [args.demo / "eval" / "pqpp_all" / view / MERGED for view in VIEWS.values()]
    if not all(f.exists() for f in files):
        print(f"no demo PQPP evaluation under {args.demo / 'eval' / 'pqpp_all'}: run `make demo` first (skipped)")
        return
    demo_cfg = OmegaConf.load(args.demo / "runs" / "pqpp" / "config.yaml")
    paths = [f"paths.data_dir={demo_cfg.paths.data_dir}", f"paths.output_dir={demo_cfg.paths.output_dir}"]
    runs = [(*read_shard(f), compose_config("eval", [*paths, f"dataset={view}"]).dataset)
            for f, view in zip(files, VIEWS.values(), strict=True)]
    eval_cfg = compose_config("eval", paths)
    grid = pqpp_config(eval_cfg)
    seg = build(eval_cfg.sam)  # the segmenter the demo evaluates with

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(["box-only (no points)", *score(runs, seg, None, 1, tmp)])
        lost = [missed(tmp / f"view{k}", dataset) for k, (_, _, dataset) in enumerate(runs)]
        for f in (0.0, 0.25, 0.35, 0.5, 0.75, 1.0):
            rows.append([f"repaired f={f:g} (threshold {args.threshold:g})",
                         *score(runs, seg, repaired(args.threshold, f), args.seeds if 0 < f < 1 else 1, tmp)])
        for e in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
            rows.append([f"noisy grid e={e:g} ({grid.grid}x{grid.grid}, every point)",
                         *score(runs, seg, noisy_grid(grid, e), args.seeds if e else 1, tmp)])
        rows.append(["exact shape in its own box (the grid, every point)", *score(runs, seg, shape_in_own_box, 1, tmp)])
    columns = ["points", *(f"{v} {k}" for v in VIEWS for k in ("cIoU", "right"))]
    print(f"PQPP's boxes from {args.demo}, re-segmented with points of known accuracy "
          f"(mean of {args.seeds} draws where random)\n")
    print(markdown_table(columns, rows, digits=3))
    box = rows[0]
    for i, view in enumerate(VIEWS):
        beat = [r for r in rows[1:] if r[1 + 2 * i] > box[1 + 2 * i]]
        least = min(beat, key=lambda r: r[2 + 2 * i], default=None)
        print(f"{view}: box-only {box[1 + 2 * i]:.3f}; " + (
            f"the least accurate points above it: {least[0]} ({least[2 + 2 * i]:.3f} right, cIoU "
            f"{least[1 + 2 * i]:.3f})" if least else "no row above it"))
    for view, (share, boxed) in zip(VIEWS, lost, strict=True):
        print(f"{view}: {share:.1%} of box-only's lost pixels are on target sentences it gives no box "
              f"(no points win them back); on the sentences it gives a box its cIoU is "
              + ("-" if boxed is None else f"{boxed:.3f}"))


if __name__ == "__main__":
    main()
