"""Mask <-> COCO segmentation (polygons, compressed and uncompressed RLE) via pycocotools."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def check_polygon(coords: Any, height: int, width: int) -> None:
    """Raise ``ValueError`` unless every vertex of a flat ``[x1, y1, x2, y2, ...]`` polygon is a
    finite number at most one image size outside the ``height x width`` image.

    Vertices a little outside the image are common and are clipped when painted, but
    pycocotools rasterises the whole outline: a NaN, an infinity or a vertex at 1e8 made it
    crash the process (a segfault, or the kernel's out-of-memory kill), which no caller can catch.
    """
    try:
        xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError) as err:  # a dict, list or word as a vertex: the loaders count only ValueError
        raise ValueError(f"polygon has a coordinate that is not a number: {err}") from None
    if not np.isfinite(xy).all():
        raise ValueError("polygon has a coordinate that is not a finite number")
    far = (xy < [-width, -height]) | (xy > [2 * width, 2 * height])
    if far.any():
        x, y = xy[far.any(1)][0]
        raise ValueError(f"polygon vertex ({x:g}, {y:g}) lies more than the image's size outside the "
                         f"{width}x{height} image")


def coco_box(ann: dict[str, Any]) -> list[float]:
    """The ``XYXY`` box of a COCO annotation's ``bbox`` ``[x, y, w, h]``; ``ValueError`` if it is not
    four finite numbers with ``w, h >= 0`` (it becomes a prompt: a NaN would reach the segmenter)."""
    box = ann.get("bbox")
    # bool is an int subclass, but true/false in a bbox is a broken annotation, not 1/0.
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            and np.isfinite(box).all() and box[2] >= 0 and box[3] >= 0):
        raise ValueError(f"bbox must be [x, y, w, h] of finite numbers with w, h >= 0, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, RLE dict with list or str counts).

    Returns an ``HxW`` bool mask. Raises ``ValueError`` for a malformed segmentation.
    """
    if isinstance(segm, list):
        if not segm or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm):
            raise ValueError("polygon segmentation must be a non-empty list of [x1, y1, x2, y2, ...] with >= 3 points")
        for polygon in segm:
            check_polygon(polygon, height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {segm['size']} does not match image size {[height, width]}")
        if isinstance(segm["counts"], list):  # uncompressed RLE (COCO iscrowd annotations)
            counts = segm["counts"]
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts must be non-negative integers summing to {height}x{width}")
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            counts = segm["counts"]
            rle = {"size": segm["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a bool ``HxW`` mask with ``str`` counts (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
