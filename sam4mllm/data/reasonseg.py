"""ReasonSeg: a folder per split of ``name.jpg`` + ``name.json`` (labelme polygons).

The mask follows the dataset's own convention: polygons are painted from the largest
to the smallest area (outline of width 1 plus fill), so smaller shapes win; a label
containing ``ignore`` paints ignored pixels, any other label paints the target, and
the deprecated label ``flag`` is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sam4mllm.data.base import Sample, SegDataset, boxes_of, load_image
from sam4mllm.data.errors import MalformedSampleError, require
from sam4mllm.data.masks import check_polygon

LAYOUT = """\
<data_dir>/
  reason_seg/ReasonSeg/
    train/  <name>.jpg  <name>.json     (239 images)
    val/    <name>.jpg  <name>.json     (200 images)
    test/   <name>.jpg  <name>.json     (779 images)
  <name>.json: {"text": [str, ...], "is_sentence": bool,
                "shapes": [{"label": "target" | "ignore" | ..., "points": [[x, y], ...]}]}"""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TARGET, _IGNORE = 1, 255


def _valid_polygon(points: Any) -> bool:
    return isinstance(points, list) and len(points) >= 3 and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in points)


def _paint(canvas: np.ndarray, points: Any, value: int) -> None:
    pts = np.array([points], dtype=np.int32)
    cv2.polylines(canvas, pts, True, value, 1)
    cv2.fillPoly(canvas, pts, value)


def rasterize_shapes(shapes: list[dict[str, Any]], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(target, ignore)`` bool masks of labelme ``shapes`` under the ReasonSeg convention.

    Raises ``ValueError`` for a vertex that is not finite or lies far outside the image.
    """
    painted = []
    for shape in shapes:
        label = str(shape["label"]).lower()
        if label == "flag":
            continue
        check_polygon(shape["points"], height, width)
        tmp = np.zeros((height, width), np.uint8)
        _paint(tmp, shape["points"], 1)
        painted.append((int(tmp.sum()), label, shape["points"]))
    canvas = np.zeros((height, width), np.uint8)
    # Stable sort, largest first, so that smaller shapes are painted last and stay visible.
    for _, label, points in sorted(painted, key=lambda t: -t[0]):
        _paint(canvas, points, _IGNORE if "ignore" in label else _TARGET)
    return canvas == _TARGET, canvas == _IGNORE


class ReasonSegDataset(SegDataset):
    """A ReasonSeg split: by default one sample per image from its first text (LISA protocol).

    Args:
        root: the ``ReasonSeg`` folder holding ``train/``, ``val/``, ``test/``.
        split: split folder name.
        all_texts: one sample per text instead of the first text only.
    """

    exif_orientation = True  # labelme drew the polygons on the turned image (as LISA's cv2.imread reads it)

    def __init__(self, root: str | Path, split: str, all_texts: bool = False, dataset: str = "reasonseg") -> None:
        super().__init__()
        self.name, self.split = dataset, split
        folder = Path(root) / split
        require(self.name, LAYOUT, folder)
        self.sources = sorted(folder.glob("*.json"))
        for js in self.sources:
            image = next((js.with_suffix(s) for s in IMAGE_SUFFIXES if js.with_suffix(s).exists()), None)
            try:
                ann = json.loads(js.read_text())
                texts = [t for t in ann["text"] if isinstance(t, str) and t.strip()]
                shapes = ann["shapes"]
                ok = all("label" in s and _valid_polygon(s["points"]) for s in shapes)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                self.skipped["malformed json"] += 1
                continue
            if image is None:
                self.skipped["image missing"] += 1
                continue
            if not texts or not ok:
                self.skipped["no text" if not texts else "malformed shape"] += 1
                continue
            for k, text in enumerate(texts if all_texts else texts[:1]):
                self.records.append({
                    "image_path": image,
                    "json_path": js,
                    "expression": text.strip(),
                    "is_sentence": bool(ann.get("is_sentence", False)),
                    "text_index": k,
                    "ann_ids": [0],
                    "task": "reasonseg",
                })
        if not self.records and not self.skipped:
            raise ValueError(f"{folder} holds no <name>.json annotations")

    def load(self, record: dict[str, Any], image: np.ndarray | None = None) -> Sample:
        image = load_image(record["image_path"], exif_orientation=self.exif_orientation) if image is None else image
        h, w = image.shape[:2]
        shapes = json.loads(Path(record["json_path"]).read_text())["shapes"]
        try:
            target, ignore = rasterize_shapes(shapes, h, w)
        except ValueError as err:
            raise MalformedSampleError(f"{record['json_path']}: {err}") from err
        masks = [target] if target.any() else []
        stem = Path(record["image_path"]).stem
        return Sample(
            image=image,
            expression=record["expression"],
            masks=masks,
            boxes=boxes_of(masks),
            task="reasonseg",
            source=self.name,
            split=self.split,
            image_id=stem,
            sample_id=f"{self.name}/{self.split}/{stem}/{record['text_index']}",
            image_path=record["image_path"],
            ignore=ignore,
            meta={"is_sentence": record["is_sentence"]},
        )
