"""The one sample type every loader returns, and the base class of the loaders."""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam4mllm.coords import Size, mask_to_box
from sam4mllm.data.errors import UNREADABLE, CorruptImageError, MalformedSampleError

Task = Literal["res", "gres", "reasonseg", "vqa"]


@dataclass
class Sample:
    """One referring sentence (or one VQA question) with its image and ground truth.

    ``masks`` holds one ``HxW`` bool mask per target at the original resolution; an
    empty list on a segmentation task means *no target*. ``boxes`` are ``(N, 4)``
    ``XYXY`` original-pixel boxes, one per mask. ``ignore`` marks pixels excluded from
    IoU (ReasonSeg). ``answers`` are the human answers of a VQA question.
    """

    image: np.ndarray
    expression: str
    masks: list[np.ndarray]
    boxes: np.ndarray
    task: Task
    source: str
    split: str
    image_id: int | str
    sample_id: str
    image_path: Path
    ignore: np.ndarray | None = None
    answers: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> Size:
        """``(H, W)`` of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def no_target(self) -> bool:
        """True for a segmentation sample whose expression refers to nothing."""
        return self.task != "vqa" and not self.masks

    def union_mask(self) -> np.ndarray:
        """Union of all target masks (all False for no target)."""
        out = np.zeros(self.size, dtype=bool)
        for m in self.masks:
            out |= m
        return out


def boxes_of(masks: Sequence[np.ndarray]) -> np.ndarray:
    """``(N, 4)`` tight ``XYXY`` boxes of ``masks``."""
    return np.array([mask_to_box(m) for m in masks], dtype=np.float64).reshape(-1, 4)


def load_image(path: Path, size: tuple[int, int] | None = None, sized_by: str = "the annotations say",
               exif_orientation: bool = False) -> np.ndarray:
    """Read an image as ``HxWx3`` uint8 RGB; a corrupt file raises :class:`CorruptImageError`, and
    one of another ``(H, W)`` than ``size`` (``sized_by``: who says so) :class:`MalformedSampleError`.

    ``exif_orientation``: turn the pixels as the file's EXIF orientation tag says, as image viewers,
    labelme (ReasonSeg's annotation tool) and ``cv2.imread`` (its official loader) do. Off, the stored
    pixel frame is kept: the one whose size COCO's ``instances.json`` records and is checked against.
    """
    if not path.exists():
        raise FileNotFoundError(f"image {path} is missing (referenced by the annotations)")
    try:
        with Image.open(path) as im:
            turned = ImageOps.exif_transpose(im) if exif_orientation else im
            image = np.array(turned.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        # A header claiming billions of pixels is refused by PIL before it allocates them.
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err
    if size is not None and image.shape[:2] != tuple(size):
        raise MalformedSampleError(f"{path} is {image.shape[1]}x{image.shape[0]} but {sized_by} "
                                   f"{size[1]}x{size[0]}")
    return image


class SegDataset(Sequence[Sample]):
    """A split of one dataset: a list of light records, decoded to :class:`Sample` on access.

    Loaders fill ``records``, count every skipped malformed entry in ``skipped``
    (reason -> count), so that nothing is dropped silently, and list the annotation
    files they read in ``sources``.
    """

    name: str = ""
    split: str = ""
    # Whether the annotations are in the frame of the images turned by their EXIF orientation
    # (load_image's exif_orientation); label files record it for the trainer to read them the same way.
    exif_orientation: bool = False

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()
        self.sources: list[Path] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.load(self.records[i])

    @abstractmethod
    def load(self, record: dict[str, Any], image: np.ndarray | None = None) -> Sample:
        """Decode one record into a :class:`Sample`.

        ``image``: the record's image, already decoded by the load of another sentence of the
        same image (:meth:`samples` passes it on, so an image is decoded once, not once per sentence).
        """

    def samples(self, indices: Iterable[int], strict: bool = False) -> Iterator[tuple[int, Sample | Exception]]:
        """``(index, sample)`` of each record in turn, each image decoded once for a run of its
        sentences; ``(index, error)`` for one that cannot be read (an ``UNREADABLE`` error),
        which ``strict`` raises instead."""
        last: Sample | None = None
        for i in indices:
            record = self.records[i]
            same = last is not None and last.image_path == record["image_path"]
            try:
                last = self.load(record, last.image if same else None)  # type: ignore[union-attr]
            except UNREADABLE as err:
                if strict:
                    raise
                yield i, err
                continue
            yield i, last

    def by_image(self) -> list[tuple[str, list[int]]]:
        """``(image key, record indices)`` per image, in order of first appearance.

        Jobs hand out whole images (label generation, evaluation), so that an image is
        decoded, and embedded by the segmenter, once for all its sentences.
        """
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            groups.setdefault(str(r.get("image_id", Path(r["image_path"]).stem)), []).append(i)
        return list(groups.items())

    def image_paths(self) -> list[Path]:
        """Every image the split references, once each (for layout checks)."""
        return sorted({Path(r["image_path"]) for r in self.records})

    def fingerprint(self) -> str:
        """Hash of the split name, the annotation files' bytes and the frame the images are read in.

        Outputs derived from a split (labels, predictions) store it, so that a regenerated or edited
        dataset is not silently paired with outputs of the old one.
        """
        h = hashlib.sha256(f"{self.name}/{self.split}".encode())
        if self.exif_orientation:  # read in another frame than before the option: outputs of the old one differ
            h.update(b"exif_orientation")
        for path in self.sources:
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, int]:
        """Counts of the split: samples, images, multi- and no-target samples, skips."""
        counts = Counter()
        for r in self.records:
            n = len(r.get("ann_ids", ()))
            counts["no_target" if n == 0 and r.get("task") != "vqa" else "multi_target" if n > 1 else "other"] += 1
        return {
            "samples": len(self.records),
            "images": len(self.image_paths()),
            "multi_target": counts["multi_target"],
            "no_target": counts["no_target"],
            "skipped": sum(self.skipped.values()),
        }
