"""One interface for every promptable segmenter.

``set_image`` computes the image embedding once and caches it; ``predict`` takes a
*batch* of prompts in original-image pixels and returns masks at the original
resolution plus one score per prompt.

Prompts: ``boxes`` ``Bx4`` ``XYXY``; ``points`` ``BxKx2`` ``(x, y)``; ``labels`` ``BxK``
with 1 = inside, 0 = outside and -1 = padding (prompts with fewer than ``K`` points).
Either boxes or points may be ``None``; a prompt needs a box or one real point.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CheckpointNotFoundError(FileNotFoundError):
    """A segmenter checkpoint is missing; the message names the official file and where it goes."""

    def __init__(self, backend: str, path: str | Path | None, official: str, source: str) -> None:
        where = f"expected it at {path}" if path else "no checkpoint path is configured"
        super().__init__(
            f"{backend}: checkpoint {official!r} not found ({where}).\n"
            f"Download {official} from {source} and point the config at it, e.g.\n"
            f"  sam.checkpoint=/path/to/{official}\n"
            "Random weights are only used when you ask for them with sam.allow_random_init=true."
        )


@dataclass
class Prediction:
    """Masks ``BxHxW`` (bool, original resolution) and scores ``B`` for a batch of prompts."""

    masks: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        self.scores = np.asarray(self.scores, dtype=np.float32)


@dataclass
class Prompts:
    """A validated batch of prompts (see the module docstring for shapes)."""

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.points)  # type: ignore[arg-type]

    @classmethod
    def make(cls, boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None) -> Prompts:
        """Check shapes and turn inputs into float/int arrays; raises ``ValueError`` on bad input."""
        if boxes is None and points is None:
            raise ValueError("a prompt needs a box or points")
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if points is not None:
            points = np.asarray(points, dtype=np.float64)
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must be BxKx2, got {points.shape}")
            if labels is None:
                raise ValueError("points need labels")
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != points.shape[:2]:
                raise ValueError(f"labels must be {points.shape[:2]}, got {labels.shape}")
            if boxes is not None and len(boxes) != len(points):
                raise ValueError(f"{len(boxes)} boxes but {len(points)} point groups")
            if boxes is None and ((labels >= 0).sum(1) == 0).any():
                raise ValueError("a prompt without a box needs at least one real point")
        return cls(boxes, points, labels)

    def n_points(self) -> np.ndarray:
        """Real (non-padding) points per prompt."""
        if self.labels is None:
            return np.zeros(len(self), dtype=np.int64)
        return (self.labels >= 0).sum(1)

    def buckets(self) -> dict[int, np.ndarray]:
        """Prompt indices grouped by real point count.

        SAM embeds a padding point as an extra token, which changes the decoder's output;
        batching only prompts of equal point count keeps every mask identical to the one
        the upstream predictor gives for that prompt alone.
        """
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(self.n_points()):
            groups[int(n)].append(i)
        return {n: np.array(ix) for n, ix in groups.items()}

    def take(self, idx: np.ndarray, n_points: int) -> Prompts:
        """The prompts ``idx`` with padding removed (all of them have ``n_points`` real points)."""
        boxes = None if self.boxes is None else self.boxes[idx]
        if self.points is None or n_points == 0:
            return Prompts(boxes, None, None)
        keep = np.argsort(self.labels[idx] < 0, axis=1, kind="stable")[:, :n_points]  # real points first
        pts = np.take_along_axis(self.points[idx], keep[..., None], axis=1)
        return Prompts(boxes, pts, np.take_along_axis(self.labels[idx], keep, axis=1))


def image_digest(image: np.ndarray) -> str:
    """A content hash of an image, to recognise one already embedded."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(str(image.shape).encode())
    return h.hexdigest()


class Segmenter(ABC):
    """Promptable segmenter: embed an image once, then segment batches of prompts."""

    name: str = "segmenter"

    def __init__(self) -> None:
        self._digest: str | None = None
        self.image_size: tuple[int, int] | None = None
        self.embed_count = 0  # how many times an image was actually embedded (cache misses)

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``HxWx3`` uint8 RGB image; a no-op when it is the image already set."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        digest = image_digest(image)
        if digest == self._digest:
            return
        self._embed(image)
        self._digest, self.image_size = digest, (int(image.shape[0]), int(image.shape[1]))
        self.embed_count += 1

    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> Prediction:
        """Segment a batch of prompts on the current image (original-image pixels)."""
        if self.image_size is None:
            raise RuntimeError("call set_image(image) before predict(...)")
        prompts = Prompts.make(boxes, points, labels)
        h, w = self.image_size
        masks = np.zeros((len(prompts), h, w), dtype=bool)
        scores = np.zeros(len(prompts), dtype=np.float32)
        for n, idx in prompts.buckets().items():
            pred = self._predict(prompts.take(idx, n))
            masks[idx], scores[idx] = pred.masks, pred.scores
        return Prediction(masks, scores)

    @abstractmethod
    def _embed(self, image: np.ndarray) -> None:
        """Compute and keep whatever the backend needs for the image."""

    @abstractmethod
    def _predict(self, prompts: Prompts) -> Prediction:
        """Segment prompts that all have the same number of real points (no padding)."""


def select_masks(masks: np.ndarray, scores: np.ndarray, select: str) -> Prediction:
    """Pick one mask per prompt from ``BxCxHxW`` candidates.

    ``best``: the highest predicted score (official behaviour); ``first``: SAM's first
    output; ``largest``: the largest area.
    """
    if masks.shape[1] == 1 or select == "first":
        idx = np.zeros(len(masks), dtype=np.int64)
    elif select == "best":
        idx = scores.argmax(1)
    elif select == "largest":
        idx = masks.reshape(*masks.shape[:2], -1).sum(-1).argmax(1)
    else:
        raise ValueError(f"unknown mask selection {select!r}: use best, first or largest")
    ar = np.arange(len(masks))
    return Prediction(masks[ar, idx], scores[ar, idx])
