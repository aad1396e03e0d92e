"""refCOCO / refCOCO+ / refCOCOg (``refs(unc|umd).p``) and gRefCOCO (``grefs(unc).json``).

One sample per sentence. In gRefCOCO ``ann_id`` is a list and ``[-1]`` means the
sentence refers to nothing; the sample then has no masks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sam4mllm.data.base import Sample, SegDataset, load_image
from sam4mllm.data.errors import MalformedSampleError, require
from sam4mllm.data.masks import coco_box, decode_segmentation
from sam4mllm.data.unpickle import load_plain_pickle

LAYOUT = """\
<data_dir>/
  refer_seg/
    refcoco/    refs(unc).p      instances.json
    refcoco+/   refs(unc).p      instances.json
    refcocog/   refs(umd).p      instances.json
    grefcoco/   grefs(unc).json  instances.json
  coco/train2014/COCO_train2014_<12-digit id>.jpg"""


def _valid_segmentation(segm: Any) -> bool:
    if isinstance(segm, list):
        return bool(segm) and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, int | float) for v in p)
            for p in segm
        )
    return isinstance(segm, dict) and "counts" in segm and "size" in segm


def _ann_ids(ref: dict[str, Any]) -> list[int]:
    ids = ref["ann_id"]
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    if ids == [-1] or ref.get("no_target") is True:
        return []
    return [int(a) for a in ids]


class ReferDataset(SegDataset):
    """A split of a refer-style dataset read from the official files.

    Args:
        root: the ``refer_seg`` folder holding one folder per dataset.
        name: dataset folder name (``refcoco``, ``refcoco+``, ``refcocog``, ``grefcoco``).
        split: ``train``/``val``/``testA``/``testB`` (refcocog umd: ``train``/``val``/``test``).
        image_dir: folder of the COCO train2014 images.
        refs_file: ``refs(unc).p``, ``refs(umd).p`` or ``grefs(unc).json``.
        dataset: name used in messages and sample ids (the Hydra config name).
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        split: str,
        image_dir: str | Path,
        refs_file: str = "refs(unc).p",
        dataset: str | None = None,
    ) -> None:
        super().__init__()
        self.name, self.split = dataset or name, split
        ann_dir = Path(root) / name
        refs_path, inst_path, self.image_dir = ann_dir / refs_file, ann_dir / "instances.json", Path(image_dir)
        require(self.name, LAYOUT, refs_path, inst_path, self.image_dir)
        self.sources = [refs_path, inst_path]
        self.task = "gres" if refs_file.startswith("grefs") else "res"

        refs = json.loads(refs_path.read_text()) if refs_path.suffix == ".json" else load_plain_pickle(refs_path)
        instances = json.loads(inst_path.read_text())
        self.images = {int(im["id"]): im for im in instances.get("images", [])}
        self.anns = {int(a["id"]): a for a in instances.get("annotations", [])}

        splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        if split not in splits:
            raise ValueError(f"{self.name} has no split {split!r}; its refs file has splits {splits}")
        for ref in refs:
            if not isinstance(ref, dict):
                self.skipped["malformed ref"] += 1
            elif ref.get("split") == split:
                self._index_ref(ref)

    def _index_ref(self, ref: dict[str, Any]) -> None:
        sentences = ref.get("sentences")
        n = len(sentences) if isinstance(sentences, list) and sentences else 1  # what a skip loses
        try:
            ann_ids, image_id = _ann_ids(ref), int(ref["image_id"])
            if not isinstance(sentences, list):
                raise TypeError("sentences is not a list")
        except (KeyError, TypeError, ValueError):
            self.skipped["malformed ref"] += n
            return
        if image_id not in self.images:
            self.skipped["image missing from instances.json"] += n
            return
        if any(a not in self.anns for a in ann_ids):
            self.skipped["annotation missing from instances.json"] += n
            return
        if not all(_valid_segmentation(self.anns[a].get("segmentation")) for a in ann_ids):
            self.skipped["malformed segmentation"] += n
            return
        image = self.images[image_id]
        for sent in sentences:
            text = str(sent.get("sent", "")).strip() if isinstance(sent, dict) else ""
            if not text:
                self.skipped["empty sentence"] += 1
                continue
            self.records.append({
                "image_path": self.image_dir / image["file_name"],
                "image_id": image_id,
                "height": int(image["height"]),
                "width": int(image["width"]),
                "expression": text,
                "ann_ids": ann_ids,
                "ref_id": ref.get("ref_id"),
                "sent_id": sent.get("sent_id"),
                "task": self.task,
            })

    def load(self, record: dict[str, Any], image: np.ndarray | None = None) -> Sample:
        h, w = record["height"], record["width"]
        if image is None:
            image = load_image(record["image_path"], (h, w), "instances.json says")
        anns = [self.anns[a] for a in record["ann_ids"]]
        try:  # an RLE of another size or a broken bbox: only decoding finds it
            masks = [decode_segmentation(a["segmentation"], h, w) for a in anns]
            boxes = np.array([coco_box(a) for a in anns], dtype=np.float64).reshape(-1, 4)
        except ValueError as err:
            raise MalformedSampleError(f"{self.name} annotation of {record['image_path']}: {err}") from err
        return Sample(
            image=image,
            expression=record["expression"],
            masks=masks,
            boxes=boxes,
            task=record["task"],
            source=self.name,
            split=self.split,
            image_id=record["image_id"],
            sample_id=f"{self.name}/{self.split}/{record['ref_id']}/{record['sent_id']}",
            image_path=record["image_path"],
            meta={"ref_id": record["ref_id"], "sent_id": record["sent_id"], "ann_ids": record["ann_ids"]},
        )
