"""``prepare_data(cfg)``: generate the synthetic benchmark, or check a downloaded dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sam4mllm import CONFIG_DIR
from sam4mllm.config import build
from sam4mllm.data import build_dataset
from sam4mllm.data.base import load_image
from sam4mllm.data.errors import CorruptImageError, MalformedSampleError
from sam4mllm.data.synthetic import generate_synthetic
from sam4mllm.report import markdown_table
from sam4mllm.viz import display_scale, save_overlay, spread

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
    by_image: dict[Path, list[dict[str, Any]]] = {}
    for r in ds.records:
        by_image.setdefault(Path(r["image_path"]), []).append(r)
    unreadable = malformed = 0
    for path in tqdm([p for p in by_image if p.exists()], desc=f"checking {name}", unit="img"):
        records = by_image[path]
        try:
            image = load_image(path, (records[0]["height"], records[0]["width"]) if "height" in records[0] else None,
                               exif_orientation=ds.exif_orientation)  # the frame ds.load reads it in
        except (CorruptImageError, MalformedSampleError) as err:
            log.warning("%s", err)
            unreadable += 1
            continue
        for r in records:  # each sentence's annotation, on the image decoded once
            try:
                ds.load(r, image)
            except MalformedSampleError as err:
                log.warning("%r: %s", r.get("expression"), err)
                malformed += 1
    return unreadable, malformed


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
    for i in spread(len(ds), n):
        s = ds[int(i)]
        title = s.expression if s.answers is None else f"{s.expression} -> {s.answers[0]}"
        save_overlay(out_dir / f"{i:03d}.png", s.image, masks=s.masks, boxes=s.boxes, ignore=s.ignore, title=title,
                     scale=display_scale(s.image.shape))
        (out_dir / f"{i:03d}.txt").write_text(title + "\n")
