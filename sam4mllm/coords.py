"""Every coordinate convention in one place.

Three spaces meet in SAM4MLLM:

* **original pixels** -- float ``(x, y)`` in the image as stored on disk; masks,
  boxes handed to SAM and all metrics live here. Boxes are ``XYXY``; ``x2, y2`` are
  the *exclusive* right/bottom edges (COCO ``x + w``), so a box covering pixel
  columns ``0..W-1`` is ``[0, W]``.
* **the 0..999 grid** -- integers relative to width/height, used by the paper's code,
  Qwen-VL v1 and Qwen2-VL / Qwen3-VL: ``v = floor(x / W * 1000 + 0.5)``, clamped to
  ``[0, 999]``. Decoding is ``x = v / 1000 * W``, so ``encode(decode(v)) == v``.
* **resized-input pixels** -- integers in the image the backbone actually sees, used
  by Qwen2.5-VL: ``v = floor(x * W' / W + 0.5)`` clamped to ``[0, W' - 1]``; decoding
  is ``x = v * W / W'``.

Rounding is half-up (not Python's banker's ``round``) so that the same pixel always
maps to the same integer whatever its parity. Everything else in the package asks a
:class:`CoordSystem` instead of doing this arithmetic itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]
"""An image size as ``(height, width)``, the order numpy and SAM use."""


def _round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5).astype(np.int64)


def _scale(xy: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Scale ``(..., 2k)`` interleaved x, y values by ``(sx, sy)``."""
    out = np.asarray(xy, dtype=np.float64).copy()
    out[..., 0::2] *= sx
    out[..., 1::2] *= sy
    return out


def _clamp(v: np.ndarray, max_x: int, max_y: int) -> np.ndarray:
    out = np.array(v, copy=True)
    out[..., 0::2] = np.clip(out[..., 0::2], 0, max_x)
    out[..., 1::2] = np.clip(out[..., 1::2], 0, max_y)
    return out


class CoordSystem(ABC):
    """Maps original-pixel coordinates to a backbone's integer text coordinates and back.

    Arrays have a trailing axis of interleaved ``x, y`` values: ``(..., 2)`` for points
    and ``(..., 4)`` for ``XYXY`` boxes. ``image_size`` is ``(H, W)`` of the original image.
    """

    @abstractmethod
    def limits(self, image_size: Size) -> tuple[int, int]:
        """Largest valid integer ``(x, y)`` in this system for an image of ``image_size``."""

    @abstractmethod
    def _factors(self, image_size: Size) -> tuple[float, float]:
        """Model units per original pixel along ``(x, y)``."""

    def to_model(self, xy: np.ndarray, image_size: Size) -> np.ndarray:
        """Original pixels -> integers in this system (half-up rounding, then clamping)."""
        sx, sy = self._factors(image_size)
        return _clamp(_round_half_up(_scale(xy, sx, sy)), *self.limits(image_size))

    def from_model(self, v: np.ndarray, image_size: Size) -> np.ndarray:
        """Integers in this system -> float original pixels (no clamping: parse clamps)."""
        sx, sy = self._factors(image_size)
        return _scale(v, 1.0 / sx, 1.0 / sy)


@dataclass(frozen=True)
class Grid(CoordSystem):
    """Integers relative to the image size on a ``bins``-step grid (0..999 by default)."""

    bins: int = 1000

    def limits(self, image_size: Size) -> tuple[int, int]:
        return self.bins - 1, self.bins - 1

    def _factors(self, image_size: Size) -> tuple[float, float]:
        h, w = image_size
        return self.bins / w, self.bins / h


@dataclass(frozen=True)
class ResizedPixels(CoordSystem):
    """Absolute integer pixels of the backbone's resized input (Qwen2.5-VL).

    ``resize`` maps the original ``(H, W)`` to the ``(H', W')`` the image processor
    produces; the backbone adapter supplies its processor's own rule.
    """

    resize: Callable[[Size], Size]

    def limits(self, image_size: Size) -> tuple[int, int]:
        h, w = self.resize(image_size)
        return w - 1, h - 1

    def _factors(self, image_size: Size) -> tuple[float, float]:
        h, w = image_size
        rh, rw = self.resize(image_size)
        return rw / w, rh / h


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight ``XYXY`` box (exclusive right/bottom) of a boolean ``HxW`` mask; zeros if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, dtype=np.float64)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
