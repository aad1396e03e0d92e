"""Overlays of masks, boxes and positive/negative prompt points, and ground truth beside
prediction, saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sam4mllm.atomic import write_atomic

PALETTE = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (160, 64, 255), (0, 200, 120), (255, 120, 200)]
POSITIVE, NEGATIVE = (0, 230, 0), (255, 0, 0)
IGNORED = (128, 128, 128)


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    p = np.pad(m.astype(bool), 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray] = (),
    boxes: np.ndarray | Sequence[Sequence[float]] = (),
    points: np.ndarray | Sequence[Sequence[float]] = (),
    labels: Sequence[int] = (),
    alpha: float = 0.5,
    title: str | None = None,
    scale: int = 1,
    ignore: np.ndarray | None = None,
) -> Image.Image:
    """Draw masks (tinted), ``XYXY`` boxes (outlines) and points (green inside, red outside).

    All coordinates are original-image pixels; ``scale`` enlarges small images so that
    points stay visible. ``ignore`` (``HxW`` bool, e.g. ReasonSeg's ignored pixels) is
    tinted grey, without an outline. Returns a PIL image; nothing is written.
    """
    canvas = image.astype(np.float32).copy()
    if ignore is not None:
        canvas[ignore] = (1 - alpha) * canvas[ignore] + alpha * np.array(IGNORED, np.float32)
    for k, m in enumerate(masks):
        color = np.array(PALETTE[k % len(PALETTE)], np.float32)
        canvas[m] = (1 - alpha) * canvas[m] + alpha * color
        # A solid outline keeps the mask readable on objects of a similar colour.
        edge = m & ~_erode(m)
        canvas[edge] = color
    out = Image.fromarray(canvas.round().astype(np.uint8))
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    # Lines and points grow with the picture too, so that they stay visible on a large photo drawn 1x.
    side = max(out.size)
    line, r = max(scale, round(side / 400)), max(2, 2 * scale, round(side / 160))
    for k, b in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        x1, y1, x2, y2 = (v * scale for v in b)
        # Exclusive right/bottom edges: the outline sits on the last covered pixel.
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=PALETTE[k % len(PALETTE)], width=line)
    for (x, y), lab in zip(np.asarray(points, dtype=float).reshape(-1, 2), labels, strict=True):
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=POSITIVE if lab else NEGATIVE, outline=(0, 0, 0))
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0))
    return out


def display_scale(shape: Sequence[int], side: int = 400) -> int:
    """The whole-number enlargement that brings an image's longer side near ``side`` pixels, at least 1:
    a 100-px synthetic image is drawn 4x, so that its points stay visible, and a COCO photo as it is."""
    return max(1, side // max(shape[:2]))


def spread(total: int, n: int) -> np.ndarray:
    """Up to ``n`` indices spread evenly over ``range(total)``, first and last included: consecutive
    samples often share one image, so the first ``n`` would show few of them."""
    return np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int))


def side_by_side(panels: Sequence[Image.Image], caption: str | None = None, gap: int = 4) -> Image.Image:
    """``panels`` left to right, ``gap`` white pixels apart, under a white strip holding ``caption``
    (long referring expressions fit there, not on one small panel)."""
    strip = 14 if caption else 0
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                            max(p.height for p in panels) + strip), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, strip))
        x += p.width + gap
    if caption:
        ImageDraw.Draw(out).text((2, 1), caption, fill=(0, 0, 0))
    return out


def save_png(path: str | Path, image: Image.Image) -> Path:
    """Write ``image`` to ``path`` as PNG, creating parent folders; atomically, since two shards
    that finish together may both draw (the same picture) and a killed job leaves no torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_overlay(path: str | Path, image: np.ndarray, **kwargs: object) -> Path:
    """:func:`overlay` and write it to ``path`` as PNG (parent folders are created)."""
    return save_png(path, overlay(image, **kwargs))  # type: ignore[arg-type]
