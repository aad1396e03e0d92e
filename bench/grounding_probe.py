"""Can a random-init tiny backbone learn to *localise* on the CPU? Val box IoU over training steps.

    python bench/grounding_probe.py [--families qwen2vl qwen3vl] [--objects 1 1] [--steps 1300]
                                    [--init-std 0.02] [--pos-std STD] [--model-seed 0] [--size 112]
                                    [--radius 0.09 0.15] [--task box|points] [--tokens N] [--branches K]

PQPP round-1 (box-only) dialogs built straight from the synthetic GT boxes (no segmenter), full
fine-tune with AdamW, batch 16, greedy decoding on 60 val sentences. It isolates the
step the CPU demo is missing (see the README): with one object per image, tiny
Qwen3-VL -- whose ViT adds a learned absolute position table -- learns to localise
within about a thousand steps, while tiny Qwen2-VL, whose ViT and LLM see positions
only through rotary phases, does not. ``--objects 2 4`` is the demo's (harder) task.

``--task points`` asks instead whether it learns to *read a point*, PQPP's round 2: each
training dialog gives the GT box as round 1's answer and asks about one fresh uniform
point in it (labelled by the GT mask), with the loss on that Yes/No alone; it reports the
val within-box AUC over the predictor's 5x5 grid in the GT box (pairs of an inside and an
outside point of the same box; 0.5 is not reading the point), next to the loss a model
reaches that knows each box's fill ratio but not where the point is.
``--branches K`` asks about K fresh points per dialog, each trained as if asked alone
(``Adapter.encode_branched``). ``--tokens N`` upscales the images to N x N image tokens
(a 100-px image: 3 x 3 for Qwen3-VL).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from sam4mllm.codec import Point
from sam4mllm.data.base import Sample
from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.dialogs import Dialog, box_question, point_question, point_turns
from sam4mllm.inference import PQPPConfig, Sam4MLLM, sample_points
from sam4mllm.labels import pixels_in_box, pqpp_label
from sam4mllm.models import build_adapter
from sam4mllm.models.adapter import IGNORE_INDEX, Adapter, Encoded
from sam4mllm.sam.grabcut import GrabCutSegmenter

# Qwen3-VL's patch is 16 px: a 128-px input gives the same 4x4 token grid as Qwen2-VL's 112 px
# (a 100-px image gives Qwen3-VL 3x3 tokens).
PIXELS = {"qwen2vl": 112 * 112, "qwen3vl": 128 * 128}
TOKEN_PX = {"qwen2vl": 28, "qwen3vl": 32}  # patch x spatial merge: the pixels one LLM image token covers


def val_box_iou(predictor: Sam4MLLM, samples: list) -> float:
    """Mean IoU of the greedy round-1 box with the GT box (0 when no box parses)."""
    adapter, ious = predictor.adapter, []
    cs = adapter.coord_system()
    for s in samples:
        text, _ = predictor.generate(box_question(s.expression, "res"), s.image)
        parsed = adapter.fmt.parse(text)
        box = (cs.from_model(np.asarray(parsed.targets[0].box, float).reshape(2, 2), s.size).reshape(4)
               if parsed.targets else None)
        ious.append(0.0 if box is None else float(box_iou(torch.tensor(box[None]), torch.tensor(s.boxes[:1]))))
    adapter.model.train()  # the predictor put it in eval mode
    return float(np.mean(ious))


def _box_dialog(adapter: Adapter, s: Sample) -> Dialog:
    return Dialog([(box_question(s.expression, "res"), adapter.fmt.encode(
        adapter.to_model_targets([{"box": s.boxes[0]}], s.size)))])


def _point_example(adapter: Adapter, s: Sample, rng: np.random.Generator, n: int = 1) -> Encoded:
    """Round 1 answered with the GT box, then ``n`` fresh points of it, each asked as its own
    branch (``Adapter.encode_branched``); the loss on the Yes/No answers only."""
    label = pqpp_label(s.masks[0], s.boxes[0], rng, n_points=n)
    e = adapter.encode_branched(_box_dialog(adapter, s), point_turns(adapter.to_model_targets([label], s.size),
                                                                     adapter.fmt), s.image)
    e.labels[(e.labels != adapter.yes_id) & (e.labels != adapter.no_id)] = IGNORE_INDEX
    return e


def val_point_auc(predictor: Sam4MLLM, samples: list) -> tuple[float, float]:
    """``(within-box AUC, share answered Yes)`` of the points round over the 5x5 grid in each GT box.

    The AUC pools the pairs of an inside and an outside point of the same box (ties count
    half), so a prior per box -- e.g. per shape -- scores 0.5: only reading the point helps.
    """
    wins, pairs, yes = 0.0, 0, []
    fmt, cs = predictor.adapter.fmt, predictor.adapter.coord_system()
    for s in samples:
        box = s.boxes[0]
        pts = sample_points(box, s.size, PQPPConfig(), np.random.default_rng(0))
        inside = s.masks[0][pts[:, 1], pts[:, 0]]
        model_box = predictor.adapter.to_model_targets([{"box": box}], s.size)[0].box
        qs = [point_question(fmt, model_box, Point(int(x), int(y)))
              for x, y in cs.to_model(pts.astype(float), s.size)]
        p_yes, p_no = predictor.score_points(predictor.prefix_from_dialog(_box_dialog(predictor.adapter, s), s.image),
                                             qs)
        p = p_yes / (p_yes + p_no)
        d = p[inside][:, None] - p[~inside][None, :]
        wins, pairs = wins + float((d > 0).sum() + 0.5 * (d == 0).sum()), pairs + d.size
        yes.append(p > 0.5)
    predictor.adapter.model.train()
    return wins / max(pairs, 1), float(np.concatenate(yes).mean())


def fill_entropy(samples: list) -> float:
    """Mean binary entropy (nats) of each GT box's fill ratio: the loss of a points round that
    knows how much of every box the object fills but not where a point is."""
    h = []
    for s in samples:
        n_in, n_out = (len(pixels_in_box(s.masks[0], s.boxes[0], inside)) for inside in (True, False))
        f = n_in / (n_in + n_out)
        h.append(0.0 if f in (0.0, 1.0) else -(f * np.log(f) + (1 - f) * np.log(1 - f)))
    return float(np.mean(h))


def probe(family: str, root: Path, tmp: Path, steps: int, every: int, init: dict[str, float | None],
          task: str = "box", tokens: int | None = None, branches: int = 1) -> list[tuple[int, float, float]]:
    """``(step, mean train loss since last report, val box IoU or within-box point AUC)`` rows
    for one family; ``init`` holds the tiny builder's ``init_std``, ``vision_pos_std`` and ``seed``."""
    torch.manual_seed(0)
    side = tokens * TOKEN_PX[family] if tokens else None
    adapter = build_adapter(family, str(tmp / family), dtype="float32", max_length=512,
                            tiny={"hidden_size": 128, "intermediate_size": 256, "num_layers": 4,
                                  "vision_embed": 64, "rope_theta": 10.0,
                                  "image_pixels": max(PIXELS[family], (side or 0) ** 2),
                                  "min_image_pixels": side * side if side else None, **init})
    split = {s: ReferDataset(root / "refer_seg", "refcoco", s, root / "coco/train2014") for s in ("train", "val")}
    train = [split["train"].load(r) for r in split["train"].records]
    val = [split["val"].load(r) for r in split["val"].records][:60]
    grid = adapter.model_inputs(adapter.render(_box_dialog(adapter, val[0])), val[0].image)["image_grid_thw"][0]
    print(f"  {family}: {int(grid[1]) // 2} x {int(grid[2]) // 2} image tokens", flush=True)
    if task == "points":
        print(f"  {family}: a points round that knows each box's fill ratio but not the point: loss "
              f"{fill_entropy(train):.3f} nats", flush=True)
    encoded = [adapter.encode(_box_dialog(adapter, s), s.image) for s in train] if task == "box" else []
    model = adapter.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng, rows, losses, t0 = np.random.default_rng(0), [], [], time.perf_counter()
    for step in range(1, steps + 1):
        picked = rng.choice(len(train), 16, replace=False)
        batch = adapter.collate([encoded[i] for i in picked] if task == "box" else
                                [_point_example(adapter, train[i], rng, branches) for i in picked])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            predictor = Sam4MLLM(adapter, GrabCutSegmenter(), max_new_tokens=24)
            if task == "box":
                rows.append((step, float(np.mean(losses)), val_box_iou(predictor, val)))
                score = f"val box IoU {rows[-1][2]:.3f}"
            else:
                auc, yes = val_point_auc(predictor, val)
                rows.append((step, float(np.mean(losses)), auc))
                score = f"val within-box point AUC {auc:.3f} ({yes:.0%} answered Yes)"
            losses = []
            print(f"  {family} step {step} ({time.perf_counter() - t0:.0f} s): loss {rows[-1][1]:.3f}, {score}",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["qwen2vl", "qwen3vl"], choices=sorted(PIXELS))
    ap.add_argument("--objects", nargs=2, type=int, default=[1, 1], help="min and max objects per image")
    ap.add_argument("--images", type=int, default=2000, help="training images")
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--every", type=int, default=325)
    ap.add_argument("--init-std", type=float, default=0.02, help="tiny-model weight init std")
    ap.add_argument("--pos-std", type=float, default=None, help="Qwen3-VL ViT position-table init std")
    ap.add_argument("--model-seed", type=int, default=0, help="tiny-model init seed (training order stays seed 0)")
    ap.add_argument("--size", type=int, default=112, help="synthetic image side in pixels")
    ap.add_argument("--radius", nargs=2, type=float, default=[0.09, 0.15], help="small and big object radius "
                    "as a fraction of the side")
    ap.add_argument("--task", choices=["box", "points"], default="box",
                    help="box: localise (round 1); points: tell inside from outside (round 2, GT box given)")
    ap.add_argument("--tokens", type=int, default=None, help="upscale images to N x N LLM image tokens")
    ap.add_argument("--branches", type=int, default=1, help="--task points: fresh points per training dialog")
    args = ap.parse_args()
    init = {"init_std": args.init_std, "vision_pos_std": args.pos_std, "seed": args.model_seed}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        generate_synthetic(root, SyntheticConfig(min_objects=args.objects[0], max_objects=args.objects[1],
                                                 width=args.size, height=args.size,
                                                 radius={"small": args.radius[0], "big": args.radius[1]},
                                                 images={"train": args.images, "val": 20}, reason_images={}))
        results = {f: probe(f, root, Path(tmp), args.steps, args.every, init, args.task, args.tokens, args.branches)
                   for f in args.families}
    score = "val box IoU" if args.task == "box" else "val within-box point AUC"
    print(f"\n| {args.objects[0]}-{args.objects[1]} objects per image, {score} | "
          + " | ".join(f"step {s}" for s, _, _ in next(iter(results.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(results.values()))))
    for family, rows in results.items():
        print(f"| tiny {family} | " + " | ".join(f"{iou:.3f}" for _, _, iou in rows) + " |")


if __name__ == "__main__":
    main()
