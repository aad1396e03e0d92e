"""PPG and PQPP training labels (paper §4.1) and the sharded, resumable label job.

* **PPG**: for each target, sample ``n_groups`` (64) groups of ``n_pos`` (2) points
  inside the mask and ``n_neg`` (1) outside it, all inside the GT box; segment box +
  group; keep the ``top_k`` (16) groups by IoU against the GT mask and pick one at
  random. One image embedding per image, all groups in one batch.
* **PQPP**: the box plus ``n_points`` (10) points inside the GT box, uniform or
  Poisson-disk, each labelled by the GT mask.
* **GRES**: one prompt set per target; a no-target sentence has no targets.

Points are integer pixel indices ``(x, y)`` (column, row) of the original image; boxes
are the annotation's ``XYXY`` box in original pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sam4mllm.config import build
from sam4mllm.data import SegDataset, build_dataset
from sam4mllm.data.errors import UNREADABLE, MalformedSampleError
from sam4mllm.device import config_on_device
from sam4mllm.sam.base import Segmenter
from sam4mllm.shards import ShardWriter, assign, iter_records, merge_shards, read_shard, shard_from_env, shard_path
from sam4mllm.viz import display_scale, overlay, save_png, side_by_side, spread

log = logging.getLogger(__name__)
LABEL_FORMAT = "sam4mllm-labels"
LABEL_VERSION = 1
MERGED_NAME = "labels.jsonl"


def _box_pixels(box: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel range ``[x1, x2) x [y1, y2)`` covered by an ``XYXY`` box (at least one pixel)."""
    h, w = shape
    x1, y1 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]), x1 + 1, w)), int(np.clip(np.ceil(box[3]), y1 + 1, h))
    return x1, y1, x2, y2


def pixels_in_box(mask: np.ndarray, box: np.ndarray, inside: bool) -> np.ndarray:
    """``(N, 2)`` pixel ``(x, y)`` inside the box where ``mask == inside``."""
    x1, y1, x2, y2 = _box_pixels(box, mask.shape)
    ys, xs = np.nonzero(mask[y1:y2, x1:x2] == inside)
    return np.stack([xs + x1, ys + y1], axis=1)


def ppg_label(
    segmenter: Segmenter,
    mask: np.ndarray,
    box: np.ndarray,
    rng: np.random.Generator,
    n_groups: int = 64,
    top_k: int = 16,
    n_pos: int = 2,
    n_neg: int = 1,
) -> dict[str, Any]:
    """One PPG label: the box and a point group picked among the ``top_k`` best of ``n_groups``.

    ``segmenter`` must already hold the image (``set_image``). Returns ``box``,
    ``points``, ``labels`` (1 inside / 0 outside), the chosen group's ``iou`` and the
    ``best_iou`` of all groups. A target whose box holds no background gets no
    negative points (the count is recorded in ``n_neg``).
    """
    from sam4mllm.metrics import score_sample

    pos_pool, neg_pool = pixels_in_box(mask, box, True), pixels_in_box(mask, box, False)
    if len(pos_pool) == 0:
        raise MalformedSampleError("the target mask has no pixel inside its annotated box")
    n_neg = n_neg if len(neg_pool) else 0
    pos = pos_pool[rng.integers(len(pos_pool), size=(n_groups, n_pos))]
    neg = neg_pool[rng.integers(len(neg_pool), size=(n_groups, n_neg))] if n_neg else np.zeros((n_groups, 0, 2), int)
    points = np.concatenate([pos, neg], axis=1)
    labels = np.concatenate([np.ones((n_groups, n_pos), int), np.zeros((n_groups, n_neg), int)], axis=1)
    pred = segmenter.predict(np.repeat(np.asarray(box, float)[None], n_groups, 0), points, labels)
    ious = np.array([score_sample(m, mask).iou for m in pred.masks])
    top = np.argsort(-ious, kind="stable")[:top_k]
    pick = int(top[rng.integers(len(top))])
    return {
        "box": [float(v) for v in box],
        "points": points[pick].tolist(),
        "labels": labels[pick].tolist(),
        "iou": float(ious[pick]),
        "best_iou": float(ious.max()),
        "n_neg": n_neg,
    }


def sample_box_points(
    box: np.ndarray, shape: tuple[int, int], n: int, rng: np.random.Generator, sampling: str = "uniform"
) -> np.ndarray:
    """``n`` distinct-as-possible pixel ``(x, y)`` inside a box, ``uniform`` or ``poisson`` (disk)."""
    x1, y1, x2, y2 = _box_pixels(box, shape)
    if sampling == "uniform":
        return np.stack([rng.integers(x1, x2, n), rng.integers(y1, y2, n)], axis=1)
    if sampling != "poisson":
        raise ValueError(f"unknown point sampling {sampling!r}: use uniform or poisson")
    # Dart throwing: accept a candidate only if it keeps distance r from the accepted
    # ones; shrink r when a pass cannot place all n points.
    cand = np.stack(np.meshgrid(np.arange(x1, x2), np.arange(y1, y2)), -1).reshape(-1, 2)
    r = np.sqrt((x2 - x1) * (y2 - y1) / (n * np.pi))
    while True:
        chosen: list[np.ndarray] = []
        for c in cand[rng.permutation(len(cand))]:
            if all(np.hypot(*(c - q)) >= r for q in chosen):
                chosen.append(c)
                if len(chosen) == n:
                    return np.array(chosen)
        if r < 1:  # fewer pixels than points: repeat some
            extra = cand[rng.integers(len(cand), size=n - len(chosen))]
            return np.concatenate([np.array(chosen).reshape(-1, 2), extra])
        r *= 0.7


def pqpp_label(
    mask: np.ndarray, box: np.ndarray, rng: np.random.Generator, n_points: int = 10, sampling: str = "uniform"
) -> dict[str, Any]:
    """One PQPP label: the box and ``n_points`` points in it, each labelled by the GT mask."""
    pts = sample_box_points(box, mask.shape, n_points, rng, sampling)
    return {
        "box": [float(v) for v in box],
        "points": pts.tolist(),
        "labels": [int(mask[y, x]) for x, y in pts],
    }


# ------------------------------------------------------------------------------ the job
def _image_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the image, not on sharding."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")])


def label_image(
    ds: SegDataset,
    record_ids: list[int],
    variant: str,
    params: dict[str, Any],
    rng: np.random.Generator,
    segmenter: Segmenter | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Labels of every sentence of one image, and the sentences left out, each with its error.

    A target shared by sentences is labelled once. A sentence with a malformed annotation
    (an RLE of another size, a mask with no pixel in its box) is left out alone, so the
    image's other sentences keep their labels; an image that cannot be read, or whose every
    sentence is malformed, raises.
    """
    done: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    first_error: MalformedSampleError | None = None
    for i, s in ds.samples(record_ids):  # the image decoded once for all its sentences
        try:
            if isinstance(s, Exception):
                raise s  # an unreadable image raises; a malformed annotation leaves out its sentence (below)
            if variant == "ppg":
                assert segmenter is not None
                segmenter.set_image(s.image)  # a no-op after the image's first sentence
            ann_ids = s.meta.get("ann_ids") or [f"{s.sample_id}/{j}" for j in range(len(s.masks))]
            targets = []
            for ann, mask, box in zip(ann_ids, s.masks, s.boxes, strict=True):
                key = str(ann)
                if key not in done:
                    done[key] = (ppg_label(segmenter, mask, box, rng, **params) if variant == "ppg"  # type: ignore[arg-type]
                                 else pqpp_label(mask, box, rng, **params))
                targets.append(done[key])
        except MalformedSampleError as err:
            first_error = first_error or err
            skipped.append({"record": i, "expression": ds.records[i].get("expression"),
                            "error": f"{type(err).__name__}: {err}"})
            continue
        out.append({"sample_id": s.sample_id, "expression": s.expression, "task": s.task, "targets": targets})
    if not out and first_error is not None:
        raise first_error  # nothing of this image was labelled: an image-level error, retried on resume
    return out, skipped


def _header(cfg: Any, data: str, exif_orientation: bool) -> dict[str, Any]:
    semantic = {
        "data": data,  # the annotation files' hash: labels of an edited dataset are not resumed
        "variant": cfg.variant,
        "labels": OmegaConf.to_container(cfg.labels, resolve=True),
        "sam": config_on_device(cfg.sam) if cfg.variant == "ppg" else None,
        "dataset": cfg.dataset.name,
        "split": cfg.split,
        "seed": cfg.seed,
        # The frame the labels' coordinates are in (SegDataset.exif_orientation), for the trainer; only
        # where the images are turned, so that the other datasets' label files stay as they were.
        **({"exif_orientation": True} if exif_orientation else {}),
    }
    digest = hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": LABEL_FORMAT, "version": LABEL_VERSION, "config_hash": digest, **semantic}


def generate_labels(cfg: Any, segmenter_factory: Callable[[], Segmenter] | None = None) -> Path | None:
    """Write this process's shard of labels and, once every shard is complete, the merged file.

    Returns the merged ``labels.jsonl`` path, or ``None`` while other shards still run.
    """
    if cfg.variant not in ("ppg", "pqpp"):
        raise ValueError(f"variant must be ppg or pqpp (use +exp=ppg or +exp=pqpp), got {cfg.variant!r}")
    ds = build_dataset(cfg.dataset, cfg.split)
    if ds.records and ds.records[0]["task"] == "vqa":
        raise ValueError("VQA samples need no SAM labels: the trainer reads VQAv2 directly")
    for reason, n in ds.skipped.items():
        log.warning("%s/%s: %d entries skipped while loading: %s", cfg.dataset.name, cfg.split, n, reason)
    segmenter: Segmenter | None = None

    def get_segmenter() -> Segmenter | None:
        # Built on first use, after the shard's header check: a rerun of another configuration, or of a
        # finished job, does not wait for SAM to load. PQPP labels come from the GT masks alone.
        nonlocal segmenter
        if segmenter is None and cfg.variant == "ppg":
            segmenter = segmenter_factory() if segmenter_factory else build(cfg.sam)
        return segmenter

    header = _header(cfg, ds.fingerprint(), ds.exif_orientation)
    index, count = shard_from_env(cfg.shard.index, cfg.shard.count)
    out_dir = Path(cfg.out_dir)
    items = ds.by_image()
    mine = assign(items, index, count)
    params = OmegaConf.to_container(cfg.labels, resolve=True)
    with ShardWriter(shard_path(out_dir, index, count), {**header, "shard": index, "num_shards": count},
                     [key for _, (key, _) in mine]) as w:
        todo = [(k, it) for k, it in mine if it[0] not in w.done]
        if len(todo) < len(mine) or w.retried:
            log.info("resuming %s: %d of %d images already labelled, %d that could not be read retried", w.path,
                     len(mine) - len(todo), len(mine), w.retried)
        if w.adopted:
            log.info("%s: %d images already labelled by shards of another count", w.path, w.adopted)
        seg = get_segmenter() if todo else None
        bar = tqdm(todo, desc=f"{cfg.variant} labels [{index + 1}/{count}]", unit="img", initial=len(mine) - len(todo),
                   total=len(mine), disable=not cfg.progress)
        for k, (key, rec_ids) in bar:
            try:
                samples, skipped = label_image(ds, rec_ids, cfg.variant, params, _image_rng(cfg.seed, key), seg)
                w.write({"key": key, "index": k, "image_path": str(ds.records[rec_ids[0]]["image_path"]),
                         "samples": samples, **({"skipped": skipped} if skipped else {})})
            except UNREADABLE as err:
                # Bad data is counted and kept in the output, so nothing is silently lost (a resume retries
                # it); any other error (a bad setting, say) stops the job.
                w.write({"key": key, "index": k, "error": f"{type(err).__name__}: {err}", "samples": []})
        errors = [r for r in w.records if "error" in r]
        left_out = [s for r in w.records for s in r.get("skipped", [])]
    if errors:
        log.warning("%d of %d images could not be labelled, e.g. %s", len(errors), len(mine), errors[0]["error"])
    if left_out:
        log.warning("%d sentences left out for a malformed annotation (their images' other sentences are "
                    "labelled), e.g. %r: %s", len(left_out), left_out[0]["expression"], left_out[0]["error"])
    merged = merge_shards(out_dir, count, len(items), header, MERGED_NAME)
    if merged:
        log.info("labels merged into %s", merged)
        if cfg.overlays:
            write_label_overlays(merged, ds, out_dir / "overlays", cfg.overlays, get_segmenter())
    return merged


def write_label_overlays(labels: Path, ds: SegDataset, out_dir: Path, n: int,
                         segmenter: Segmenter | None = None) -> list[Path]:
    """Overlay PNGs of ``n`` labelled sentences spread over a merged labels file: the ground truth
    (left) beside the label (right): its boxes and points (green inside, red outside) and, for a
    PPG label with ``segmenter`` given, the mask the segmenter makes of them. A PPG panel is titled
    with the IoU the label job recorded for its point group, which that mask reproduces when the
    segmenter is the job's."""
    header, records = read_shard(labels)
    for old in out_dir.glob("[0-9]*.png"):  # a rerun's picks replace the last run's, not add to them
        old.unlink(missing_ok=True)  # another shard finishing at once may draw the same ones
    items = ds.by_image()
    labelled = [(r["index"], s) for r in records for s in r["samples"]]
    paths, unreadable = [], 0
    for j in spread(len(labelled), n):
        k, label = labelled[j]
        sample = next((s for _, s in ds.samples(items[k][1])
                       if not isinstance(s, Exception) and s.sample_id == label["sample_id"]), None)
        if sample is None:  # its image went missing or bad since it was labelled
            unreadable += 1
            continue
        targets = label["targets"]
        masks = []
        if header["variant"] == "ppg" and segmenter is not None and targets:
            segmenter.set_image(sample.image)
            # One call per target: a target whose box holds no background has no negative point.
            masks = [segmenter.predict(np.array([t["box"]], float), np.array([t["points"]]),
                                       np.array([t["labels"]])).masks[0] for t in targets]
        inside = sum(lb for t in targets for lb in t["labels"])
        title = ("label: no target" if not targets
                 else "PPG label: IoU " + ", ".join(f"{t['iou']:.3f}" for t in targets) if header["variant"] == "ppg"
                 else f"PQPP label: {inside} of {sum(len(t['labels']) for t in targets)} points inside")
        scale = display_scale(sample.image.shape)
        gt = overlay(sample.image, masks=sample.masks, boxes=sample.boxes, scale=scale,
                     title="ground truth" if sample.masks else "ground truth: no target")
        right = overlay(sample.image, masks=masks, boxes=[t["box"] for t in targets],
                        points=[p for t in targets for p in t["points"]],
                        labels=[lb for t in targets for lb in t["labels"]], scale=scale, title=title)
        paths.append(save_png(out_dir / f"{j:05d}.png", side_by_side([gt, right], sample.expression)))
    if unreadable:
        log.warning("%d label overlays left out: their images cannot be read any more", unreadable)
    return paths


def label_stats(path: Path) -> dict[str, float | int]:
    """Counts and mean PPG IoU of a merged labels file."""
    n_img = n_err = n_skipped = n_samples = n_no_target = 0
    ious = []
    for r in iter_records(path):
        n_img += 1
        n_err += "error" in r
        n_skipped += len(r.get("skipped", []))
        for s in r["samples"]:
            n_samples += 1
            n_no_target += not s["targets"]
            ious += [t["iou"] for t in s["targets"] if "iou" in t]
    return {"images": n_img, "errors": n_err, "skipped_sentences": n_skipped, "samples": n_samples,
            "no_target": n_no_target, "mean_iou": float(np.mean(ious)) if ious else float("nan")}
