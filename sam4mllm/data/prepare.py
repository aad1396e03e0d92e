"""``prepare_data(cfg)``: generate the synthetic benchmark, or check a downloaded dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sam4mllm import CONFIG_DIR
from sam4mllm.config import build
from sam4mllm.data import build_dataset
from sam4mllm.data.base import load_image
from sam4mllm.data.errors import CorruptImageError, MalformedSampleError
from sam4mllm.data.synthetic import generate_synthetic
from sam4mllm.report import markdown_table
from sam4mllm.viz import save_overlay

log = logging.getLogger(__name__)
SYNTHETIC_VIEWS = ("synthetic", "synthetic_gres", "synthetic_reasonseg", "synthetic_vqa")


def split_counts(dataset_cfg: Any, check_images: bool = False) -> list[list[object]]:
    """Rows ``[split, samples, official, images, missing images, unreadable images, malformed annotations,
    multi, no-target, skipped]``.

    ``check_images`` decodes every image that exists (slow on a full download) and counts
    those that do not decode or differ in size from their annotations, then decodes every
    sentence of a readable image and counts those whose annotation does not (an RLE of
    another size, a broken bbox: what indexing cannot see); otherwise both columns are ``-``.
    """
    rows = []
    official = dataset_cfg.official_counts or {}
    for split in dataset_cfg.splits:
        ds = build_dataset(dataset_cfg, split)
        summary = ds.summary()
        missing = sum(not p.exists() for p in ds.image_paths())
        bad, malformed = _check_split(ds, f"{dataset_cfg.name}/{split}") if check_images else ("-", "-")
        rows.append([split, summary["samples"], official.get(split), summary["images"], missing, bad, malformed,
                     summary["multi_target"], summary["no_target"], summary["skipped"]])
        for reason, n in ds.skipped.items():
            log.warning("%s/%s: skipped %d entries: %s", dataset_cfg.name, split, n, reason)
    return rows


COUNT_HEADERS = ["split", "samples", "official", "images", "missing images", "unreadable images",
                 "malformed annotations", "multi-target", "no-target", "skipped"]


def _check_split(ds: Any, name: str) -> tuple[int, int]:
    """Unreadable images of ``ds`` and sentences of readable images whose annotation does not decode; each logged.

    An unreadable image is one that exists but does not decode, or whose size differs from the annotations'.
    """
    sizes = {Path(r["image_path"]): (r["height"], r["width"]) if "height" in r else None for r in ds.records}
    unreadable: set[Path] = set()
    for path in tqdm([p for p in sizes if p.exists()], desc=f"checking {name} images", unit="img"):
        try:
            load_image(path, sizes[path])
        except (CorruptImageError, MalformedSampleError) as err:
            log.warning("%s", err)
            unreadable.add(path)
    # Loading a sentence decodes its image again: simple, and this check is slow by nature.
    readable = [r for r in ds.records if (p := Path(r["image_path"])).exists() and p not in unreadable]
    malformed = 0
    for r in tqdm(readable, desc=f"checking {name} annotations", unit="sent"):
        try:
            ds.load(r)
        except MalformedSampleError as err:
            log.warning("%r: %s", r.get("expression"), err)
            malformed += 1
    return len(unreadable), malformed


def prepare_data(cfg: Any) -> dict[str, list[list[object]]]:
    """Generate (synthetic) or check (real) ``cfg.dataset``; print and return its count tables."""
    tables: dict[str, list[list[object]]] = {}
    if cfg.dataset.synthetic:
        report = generate_synthetic(cfg.dataset.root, build(cfg.synthetic))
        print(f"Synthetic benchmark written to {report.root} (seed {cfg.synthetic.seed})")
        # Read every view back through the real loaders: the same code path as real data.
        for view in SYNTHETIC_VIEWS:
            view_cfg = _view(cfg, view)
            tables[view] = split_counts(view_cfg)
            _print(view, tables[view])
            if cfg.overlays:
                _write_overlays(view_cfg, Path(cfg.overlay_dir) / view, int(cfg.overlays))
        if cfg.overlays:
            print(f"Overlays: {cfg.overlay_dir}")
    else:
        tables[cfg.dataset.name] = split_counts(cfg.dataset, cfg.check_images)
        _print(cfg.dataset.name, tables[cfg.dataset.name])
    return tables


def _view(cfg: Any, name: str) -> Any:
    """The ``dataset/<name>`` config resolved against ``cfg``'s paths and split."""
    view = OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml")
    return OmegaConf.merge({"paths": cfg.paths, "dataset": view}).dataset


def _print(name: str, rows: list[list[object]]) -> None:
    print(f"\n{name}\n" + markdown_table(COUNT_HEADERS, rows))


def _write_overlays(dataset_cfg: Any, out_dir: Path, n: int) -> None:
    ds = build_dataset(dataset_cfg, dataset_cfg.split)
    # Spread the picks over the split: consecutive samples often share one image.
    for i in np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)):
        s = ds[int(i)]
        title = s.expression if s.answers is None else f"{s.expression} -> {s.answers[0]}"
        masks = s.masks + ([s.ignore] if s.ignore is not None and s.ignore.any() else [])
        save_overlay(out_dir / f"{i:03d}.png", s.image, masks=masks, boxes=s.boxes, title=title, scale=4)
        (out_dir / f"{i:03d}.txt").write_text(title + "\n")
