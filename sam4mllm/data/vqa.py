"""VQAv2: the official questions and annotations json files plus COCO images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sam4mllm.data.base import Sample, SegDataset, load_image
from sam4mllm.data.errors import require

LAYOUT = """\
<data_dir>/
  vqav2/
    v2_OpenEnded_mscoco_<split>_questions.json   {"questions": [{question_id, image_id, question}]}
    v2_mscoco_<split>_annotations.json           {"annotations": [{question_id, answers: [{answer}] x10,
                                                   multiple_choice_answer, answer_type, question_type}]}
  coco/<split>/COCO_<split>_<12-digit image id>.jpg      (split: train2014 | val2014)"""


class VQADataset(SegDataset):
    """A VQAv2 split; each sample carries its question and the 10 human answers.

    Args:
        root: folder holding the questions and annotations files.
        split: ``train2014`` or ``val2014`` (it fills ``{split}`` in the file names).
        image_dir: folder of that split's COCO images.
        questions_file / annotations_file / image_pattern: official names, overridable.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_dir: str | Path,
        questions_file: str = "v2_OpenEnded_mscoco_{split}_questions.json",
        annotations_file: str = "v2_mscoco_{split}_annotations.json",
        image_pattern: str = "COCO_{split}_{image_id:012d}.jpg",
        dataset: str = "vqav2",
    ) -> None:
        super().__init__()
        self.name, self.split = dataset, split
        q_path = Path(root) / questions_file.format(split=split)
        a_path = Path(root) / annotations_file.format(split=split)
        image_dir = Path(image_dir)
        require(self.name, LAYOUT, q_path, a_path, image_dir)
        self.sources = [q_path, a_path]
        questions = json.loads(q_path.read_text())["questions"]
        answers = {int(a["question_id"]): a for a in json.loads(a_path.read_text())["annotations"]}
        for q in questions:
            try:
                qid, image_id, text = int(q["question_id"]), int(q["image_id"]), str(q["question"])
                ann = answers[qid]
                human = [str(a["answer"]) for a in ann["answers"]]
            except (KeyError, TypeError, ValueError):
                self.skipped["question without a valid annotation"] += 1
                continue
            if not human:
                self.skipped["no human answers"] += 1
                continue
            self.records.append({
                "image_path": image_dir / image_pattern.format(split=split, image_id=image_id),
                "image_id": image_id,
                "question_id": qid,
                "expression": text,
                "answers": human,
                "answer_type": ann.get("answer_type"),
                "multiple_choice_answer": str(ann.get("multiple_choice_answer") or max(human, key=human.count)),
                "question_type": ann.get("question_type"),
                "task": "vqa",
            })

    def load(self, record: dict[str, Any], image: np.ndarray | None = None) -> Sample:
        return Sample(
            image=load_image(record["image_path"]) if image is None else image,
            expression=record["expression"],
            masks=[],
            boxes=np.zeros((0, 4)),
            task="vqa",
            source=self.name,
            split=self.split,
            image_id=record["image_id"],
            sample_id=f"{self.name}/{self.split}/{record['question_id']}",
            image_path=record["image_path"],
            answers=record["answers"],
            meta={k: record[k] for k in ("question_id", "answer_type", "question_type", "multiple_choice_answer")},
        )
