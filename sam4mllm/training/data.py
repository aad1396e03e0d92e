"""Training examples: label shards and VQAv2 turned into dialogs, mixed by per-source ratios.

No augmentation: flips and crops would change "left"/"right" (paper §3.3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam4mllm.data import build_dataset
from sam4mllm.data.base import load_image
from sam4mllm.data.errors import UNREADABLE
from sam4mllm.dialogs import Dialog, point_turns, ppg_dialog, pqpp_dialog, vqa_dialog
from sam4mllm.models.adapter import Adapter, Encoded, SampleTooLongError
from sam4mllm.shards import read_shard

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One training conversation before tokenisation."""

    image_path: Path
    kind: str                       # "seg" or "vqa"
    expression: str
    task: str = "res"
    targets: list[dict[str, Any]] | None = None
    answer: str | None = None
    more: tuple[Example, ...] = ()  # further sentences about the same image, asked after this one
    exif_orientation: bool = False  # the labels' frame: the image turned by its EXIF tag (ReasonSeg's)

    def image(self) -> np.ndarray:
        """The example's image, in the frame its labels are in."""
        return load_image(self.image_path, exif_orientation=self.exif_orientation)


def label_examples(path: str | Path, variant: str, source: str = "<source>",
                   sentences_per_dialog: int = 1, leave_out: str | None = None) -> list[Example]:
    """One example per sentence of a merged ``labels.jsonl`` (its header must match ``variant``),
    or per ``sentences_per_dialog`` consecutive sentences of one image packed into one
    conversation (the official code packs up to 5: the image is encoded once for all).

    A missing file raises an error naming the label job that writes it (the dataset and
    split read from gen_labels' layout ``.../<variant>/<dataset>/<split>/labels.jsonl``)
    and how to train without ``source`` instead (``leave_out``: the override that does it,
    by default switching the training source off).
    """
    path = Path(path)
    if not path.exists():
        laid_out = len(path.parents) > 3 and path.parents[2].name == variant
        dataset, split = (path.parent.parent.name, path.parent.name) if laid_out else ("<its dataset>", "<its split>")
        raise FileNotFoundError(
            f"label file {path} (training source {source!r}) is missing; generate it with\n"
            f"  python scripts/gen_labels.py +exp={variant} dataset={dataset} split={split}\n"
            f"or train without it: {leave_out or f'data.sources.{source}.ratio=0'}"
        )
    header, records = read_shard(path)
    if header.get("variant") != variant:
        raise ValueError(f"{path} holds {header.get('variant')} labels but this run trains {variant}")
    if sentences_per_dialog < 1:
        raise ValueError(f"sentences_per_dialog={sentences_per_dialog}: use 1 (one sentence per dialog) or more")
    turned = bool(header.get("exif_orientation"))
    out = []
    for r in records:
        sentences = [Example(Path(r["image_path"]), "seg", s["expression"], s["task"], s["targets"],
                             exif_orientation=turned) for s in r["samples"]]
        for k in range(0, len(sentences), sentences_per_dialog):
            first, *more = sentences[k:k + sentences_per_dialog]
            out.append(dataclasses.replace(first, more=tuple(more)))
    return out


def _fingerprint_row(e: Example) -> list[Any]:
    row = [str(e.image_path), e.kind, e.expression, e.task, e.targets, e.answer]
    if e.exif_orientation:  # only then, so that the other runs keep the fingerprints they resume from
        row.append("exif_orientation")
    # Packed sentences only extend the row, so unpacked runs keep the fingerprints they resume from.
    return [*row, [_fingerprint_row(m) for m in e.more]] if e.more else row


def examples_digest(examples: Sequence[Example], *extra: Any) -> str:
    """A hash of ``examples`` (and ``extra``, e.g. a source's ratio): what a checkpoint knows its data by."""
    return hashlib.sha256(json.dumps([*extra, [_fingerprint_row(e) for e in examples]]).encode()).hexdigest()[:16]


def vqa_examples(dataset: Any) -> list[Example]:
    """One example per VQA question, answered with its most common human answer."""
    return [Example(Path(r["image_path"]), "vqa", r["expression"], "vqa", answer=r["multiple_choice_answer"])
            for r in dataset.records]


class MixtureDataset(torch.utils.data.Dataset):
    """A weighted mixture of sources, tokenised on access.

    ``sources`` maps a name to ``(examples, ratio)``: each epoch draws
    ``round(len * ratio)`` examples from a source (without replacement while they
    last), then shuffles all draws together; both depend only on ``seed`` and the epoch.
    """

    def __init__(self, sources: dict[str, tuple[list[Example], float]], adapter: Adapter | None, variant: str,
                 pqpp_mode: str = "per_point", seed: int = 0) -> None:
        self.sources, self.adapter, self.variant, self.pqpp_mode, self.seed = sources, adapter, variant, pqpp_mode, seed
        self.stats: Counter[str] = Counter()
        self.unusable: dict[tuple[str, int], str] = {}  # draw -> "too_long" or "unreadable"
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's examples."""
        rng = np.random.default_rng([self.seed, epoch])
        draws: list[tuple[str, int]] = []
        for name, (examples, ratio) in sorted(self.sources.items()):
            n = round(len(examples) * ratio)
            if n == 0 or not examples:  # a source switched off (ratio 0) or empty
                continue
            idx = np.concatenate([rng.permutation(len(examples)) for _ in range(-(-n // max(len(examples), 1)))])
            draws += [(name, int(i)) for i in idx[:n]]
        self.items = [draws[i] for i in rng.permutation(len(draws))]

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> dict[str, str]:
        """Per source, a hash of its ratio and examples: what the draws depend on besides the seed.

        A checkpoint stores it, so a resume over changed data (a labels file regenerated, a
        source added) is refused rather than drawing other examples than the run it continues.
        """
        return {name: examples_digest(examples, ratio) for name, (examples, ratio) in sorted(self.sources.items())}

    def encode(self, ex: Example, image: np.ndarray) -> Encoded:
        """One example's training dialog, encoded (PQPP ``branch``: round 2 as branches after round 1).

        Packed sentences (``ex.more``) follow the first one's turns in the same conversation."""
        if ex.kind == "vqa":
            return self.adapter.encode(vqa_dialog(ex.expression, ex.answer or ""), image)
        fmt, turns = self.adapter.fmt, []
        for e in (ex, *ex.more):
            targets = self.adapter.to_model_targets(e.targets or [], image.shape[:2])
            dialog = (ppg_dialog(e.expression, targets, e.task, fmt) if self.variant == "ppg"
                      else pqpp_dialog(e.expression, targets, e.task, fmt, self.pqpp_mode))
            turns += dialog.turns
        if self.variant == "pqpp" and self.pqpp_mode == "branch":  # one sentence (build_mixture refuses packing)
            return self.adapter.encode_branched(Dialog(turns[:1]), point_turns(targets, fmt), image)
        return self.adapter.encode(Dialog(turns), image)

    def __getitem__(self, i: int) -> Encoded:
        """Draw ``i``, encoded. A draw that cannot be trained on, because its first turn alone
        exceeds ``max_length`` or its image is missing or corrupt, is replaced by the next one
        that can (each such example counted once in ``stats["too_long"]`` or
        ``stats["unreadable"]``; the first unreadable image is also logged when met, so a
        long run says so early rather than crashing hours in). Skipping it instead left its
        micro-batch short or empty and the ranks at different places in the epoch, so a
        multi-rank run resumed from its checkpoint (one position for all ranks) no longer
        followed the uninterrupted run."""
        for k in range(len(self.items)):
            name, j = self.items[(i + k) % len(self.items)]
            if (name, j) in self.unusable:
                continue
            ex = self.sources[name][0][j]
            try:
                enc = self.encode(ex, ex.image())
            except SampleTooLongError:
                self._set_unusable(name, j, "too_long")
                continue
            except UNREADABLE as err:
                if not self.stats["unreadable"]:
                    log.warning("source %s: %s; such examples are replaced by the next draw and counted", name, err)
                self._set_unusable(name, j, "unreadable")
                continue
            self.stats["dropped_turns"] += enc.dropped_turns
            self.stats["truncated_samples"] += enc.dropped_turns > 0
            return enc
        why = Counter(self.unusable.values())
        raise ValueError(f"no example can be trained on: {why['too_long']} too long for model.max_length="
                         f"{self.adapter.max_length}, {why['unreadable']} with a missing or corrupt image")

    def _set_unusable(self, name: str, j: int, reason: str) -> None:
        self.unusable[(name, j)] = reason
        self.stats[reason] += 1


def build_mixture(sources: Any, adapter: Adapter | None, variant: str, pqpp_mode: str = "per_point",
                  seed: int = 0, sentences_per_dialog: int = 1) -> MixtureDataset:
    """The training mixture of a ``data.sources`` config. A source switched off (ratio 0)
    draws nothing, so it is not loaded and its files need not exist. ``sentences_per_dialog``
    packs that many sentences of one image into each labels example (VQA stays one per dialog).
    ``adapter`` encodes the draws; it may be set on the result later (the trainer reads its
    data before it loads the model)."""
    if sentences_per_dialog > 1 and variant == "pqpp" and pqpp_mode == "branch":
        raise ValueError("pqpp_mode=branch trains one sentence's points as branches of its dialog; it does not "
                         "pack sentences (sentences_per_dialog=1), use per_point or joint to pack them")
    loaded = {}
    for name, src in sources.items():
        if float(src.ratio) == 0:
            continue
        examples = (label_examples(src.path, variant, name, sentences_per_dialog) if src.kind == "labels"
                    else vqa_examples(build_dataset(src.dataset, src.dataset.split)))
        loaded[name] = (examples, float(src.ratio))
    return MixtureDataset(loaded, adapter, variant, pqpp_mode, seed)
