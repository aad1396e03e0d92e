"""``Sam4MLLM.segment(image, expression)``: the MLLM writes SAM prompts, the segmenter draws masks.

* **PPG**: one generated turn gives a box and points per target.
* **PQPP**: round 1 generates the box(es); round 2 samples points in each box (an NxN
  grid by default, N random points, or the reference code's fixed points) and asks the
  MLLM about each. A point is kept when the probability of the answer it gives (``Yes``
  or ``No``) exceeds the threshold (0.9; the reference code keeps ``Yes`` above 0.75); a
  box whose points all fail falls back to the box alone.
* **box-only**: round 1 alone, the box straight to the segmenter (a baseline).

Fast PQPP encodes image + dialog prefix once and scores every point question of a box
in ONE forward over a copy of the prefix cache -- the text the questions share once,
then each question's own tokens (the point) packed under a block attention mask --
reading ``P(Yes)`` / ``P(No)`` from the logits without ``generate()``. :meth:`Sam4MLLM.score_points` with
``fast=False`` is the reference: one full independent forward per point.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sam4mllm.codec import ParseResult, Point
from sam4mllm.dialogs import Dialog, box_question, joint_question, point_question, ppg_dialog, shared_stem
from sam4mllm.models.adapter import Adapter, branch_visibility
from sam4mllm.sam.base import Segmenter

VARIANTS = ("ppg", "pqpp", "box_only")
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class Prefix:
    """A dialog so far: the prompt's model inputs, every token id up to the end of the last
    answer's text, and (for fast PQPP) the KV cache of those tokens and the rope offset.

    A batched answer may hold its prompt's ``input_ids`` only (:meth:`Sam4MLLM.generate_many`).
    """

    inputs: dict[str, torch.Tensor]
    ids: list[int]
    cache: Any = None
    rope_deltas: torch.Tensor | None = None
    truncated: bool = False  # the answer reached max_new_tokens without ending: its tail may be cut


# The points the paper's public code asks about at inference, as percentages of the box's
# width and height (it uses the first 15). Data, not a formula: fixed quasi-random positions.
FIXED_POINTS = ((93, 70), (51, 89), (91, 90), (32, 32), (88, 10), (12, 28), (29, 52), (49, 49), (28, 12), (59, 60),
                (9, 48), (52, 29), (31, 92), (68, 13), (73, 73), (69, 53), (48, 9), (19, 18), (71, 93), (53, 69),
                (89, 50), (11, 88), (33, 72), (39, 41), (72, 33), (13, 68), (79, 82), (8, 8), (81, 22), (92, 30))


@dataclass
class PQPPConfig:
    """Round-2 settings.

    ``sampling``: ``grid`` (``grid`` x ``grid`` cell centres), ``random`` (``n_random``
    uniform points) or ``fixed`` (the first ``n_random`` of :data:`FIXED_POINTS`). An answer
    is kept when its probability exceeds ``threshold``, or ``yes_threshold`` for a ``Yes``
    when set (the reference code: ``No`` above 0.9, ``Yes`` above 0.75).
    """

    sampling: str = "grid"
    grid: int = 5
    n_random: int = 25
    threshold: float = 0.9
    yes_threshold: float | None = None
    mode: str = "per_point"     # per_point (paper) | joint (official code)
    fast: bool = True           # shared-prefix batched scoring (per_point only)

    @property
    def yes_bar(self) -> float:
        """The probability a ``Yes`` must exceed to be kept."""
        return self.threshold if self.yes_threshold is None else self.yes_threshold

    def kept(self, inside: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """Which answers (``inside``: ``Yes``; ``conf``: the answer's probability) are kept."""
        return conf > np.where(inside, self.yes_bar, self.threshold)


@dataclass
class SegmentResult:
    """What :meth:`Sam4MLLM.segment` returns; coordinates are original-image pixels."""

    masks: list[np.ndarray]
    boxes: np.ndarray
    points: list[np.ndarray] = field(default_factory=list)        # per target, (K, 2)
    labels: list[np.ndarray] = field(default_factory=list)        # per target, (K,) 1 inside / 0 outside
    confidences: list[np.ndarray] = field(default_factory=list)   # per target, (K,)
    text: str = ""
    valid: bool = True
    reason: str = "ok"
    no_target: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    truncated: bool = False  # round 1's answer reached max_new_tokens without ending (targets may be cut)

    def union(self, size: tuple[int, int]) -> np.ndarray | None:
        """Union of the target masks; ``None`` for a no-target (or invalid) answer."""
        if not self.masks:
            return None
        out = np.zeros(size, dtype=bool)
        for m in self.masks:
            out |= m
        return out


def sample_points(box: np.ndarray, size: tuple[int, int], cfg: PQPPConfig, rng: np.random.Generator) -> np.ndarray:
    """``(N, 2)`` integer pixel points in an ``XYXY`` box: grid cell centres, uniform random or fixed."""
    h, w = size
    x1, y1, x2, y2 = box
    if cfg.sampling == "grid":
        t = (np.arange(cfg.grid) + 0.5) / cfg.grid
        xs, ys = np.meshgrid(x1 + t * (x2 - x1), y1 + t * (y2 - y1))
        pts = np.stack([xs.ravel(), ys.ravel()], 1)
    elif cfg.sampling == "random":
        pts = np.stack([rng.uniform(x1, x2, cfg.n_random), rng.uniform(y1, y2, cfg.n_random)], 1)
    elif cfg.sampling == "fixed":
        if not 0 < cfg.n_random <= len(FIXED_POINTS):
            raise ValueError(f"sampling=fixed has {len(FIXED_POINTS)} points; n_random={cfg.n_random}")
        pts = np.asarray([x1, y1]) + np.asarray(FIXED_POINTS[: cfg.n_random]) / 100 * [x2 - x1, y2 - y1]
    else:
        raise ValueError(f"unknown point sampling {cfg.sampling!r}: use grid, random or fixed")
    return np.clip(np.floor(pts), 0, [w - 1, h - 1]).astype(np.int64)


def _copy_cache(cache: Any) -> Any:
    """A copy of a prefix cache that a forward may extend, leaving the original intact.

    A forward rebinds the cache's tensors (it concatenates), so for plain dynamic layers
    new layer objects over the same tensors suffice; anything else is deep-copied.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(layer) is DynamicLayer for layer in layers):
        fork = copy.copy(cache)
        fork.layers = [copy.copy(layer) for layer in layers]
        return fork
    return copy.deepcopy(cache)


def _row_cache(cache: Any, row: int, start: int, end: int) -> Any:
    """Row ``row`` of a batch's KV cache, positions ``start:end`` (its left padding, and whatever was
    generated after its answer, cut off); ``None`` unless every layer is a dynamic one holding every
    position (a sliding window that has dropped some does not).

    Positions past the cache (the last token of an answer cut at ``max_new_tokens`` is never
    fed back) are simply missing: scoring encodes the ids its cache lacks. Plain layers are
    views, so the batch's cache lives until its last row goes: no more memory than generating took.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                         or getattr(layer, "cumulative_length", 0) > layer.keys.shape[-2] for layer in layers):
        return None
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in layers]
    for layer in fork.layers:
        layer.keys, layer.values = (t[row:row + 1, :, start:end] for t in (layer.keys, layer.values))
        if layer.is_sliding:  # _copy_cache deep-copies such a layer: a view would copy the whole batch's
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
            layer.cumulative_length = layer.keys.shape[-2]
    return fork


def _text_positions(pos: torch.Tensor, rope_deltas: torch.Tensor | None) -> torch.Tensor:
    """Position ids of text tokens at sequence positions ``pos`` ``(1, L)`` after a cached prompt.

    Qwen-VL's rotary positions are 3-D and the image's are its own, so text after the image
    runs on offset by the prompt's rope delta; other models take ``pos`` as it is.
    """
    if rope_deltas is None:
        return pos
    return (pos + rope_deltas.cpu()[:1]).unsqueeze(0).expand(3, -1, -1)


def segment_targets(segmenter: Segmenter, boxes: np.ndarray, points: Sequence[np.ndarray],
                    labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One mask per target (box + its points) in one segmenter call; shorter point lists are padded with -1."""
    if len(boxes) == 0:
        return []
    k = max((len(p) for p in points), default=0)
    if k == 0:
        return list(segmenter.predict(np.asarray(boxes, float)).masks)
    pts = np.zeros((len(boxes), k, 2))
    lab = -np.ones((len(boxes), k), np.int64)
    for i, (p, lb) in enumerate(zip(points, labels, strict=True)):
        pts[i, : len(p)], lab[i, : len(lb)] = p, lb
    return list(segmenter.predict(np.asarray(boxes, float), pts, lab).masks)


class Sam4MLLM:
    """An MLLM (through its :class:`Adapter`) plus a :class:`Segmenter`.

    Args:
        adapter: the backbone, with its trained weights loaded.
        segmenter: any promptable segmenter.
        variant: ``ppg``, ``pqpp`` or ``box_only``.
        pqpp: round-2 settings.
        max_new_tokens: generation budget of a round (``min_new_tokens`` forces a length: benchmarks);
            an answer that reaches it is flagged ``truncated``.
        seed: seeds random point sampling (per call, from the expression and image).
    """

    def __init__(self, adapter: Adapter, segmenter: Segmenter, variant: str = "pqpp", pqpp: PQPPConfig | None = None,
                 max_new_tokens: int = 1024, seed: int = 0, min_new_tokens: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
        self.adapter, self.segmenter, self.variant = adapter, segmenter, variant
        self.pqpp = pqpp or PQPPConfig()
        self.max_new_tokens, self.min_new_tokens, self.seed = max_new_tokens, min_new_tokens, seed
        self.model = adapter.model.eval()
        self._glue_ids: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _reset_rope(self) -> None:
        # Qwen-VL models cache their rope offset per image; a new prefix must recompute it.
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None

    @torch.inference_mode()
    def generate(self, question: str, image: np.ndarray, keep_cache: bool = False) -> tuple[str, Prefix]:
        """Greedy answer to one question about the image, and the dialog prefix it leaves behind."""
        self._reset_rope()
        inputs = self._encode(Dialog([(question, "")]), image, open_last=True)
        out = self._greedy(inputs)
        text, new, truncated = self._answer(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        cache = out.cache if keep_cache else None
        return text, Prefix(inputs, inputs["input_ids"][0].tolist() + new, cache, self._rope_deltas(), truncated)

    @torch.inference_mode()
    def generate_many(self, questions: Sequence[str], images: Sequence[np.ndarray], keep_cache: bool = False
                      ) -> list[tuple[str, Prefix]]:
        """:meth:`generate` for several questions (one image each) as one left-padded batch.

        Decoding is the costly, sequential part of an evaluation, and a batch decodes its
        questions together. Each prefix holds its prompt's ids, padding cut off. ``keep_cache``:
        the prefixes will be scored (PQPP's points round), so each also gets its row of the
        batch's KV cache and the points round does not encode the prompt again; where it
        must (no row to keep, or ``pqpp.fast=false``), its model inputs (the image processed again).
        """
        if len(questions) <= 1 or not self.adapter.batch_generation:
            return [self.generate(q, im, keep_cache) for q, im in zip(questions, images, strict=True)]
        self._reset_rope()
        texts = [self.adapter.render(Dialog([(q, "")]), with_last_answer=False) for q in questions]
        batch = {k: v.to(self._device) for k, v in self.adapter.model_inputs_batch(texts, images).items()}
        out, n = self._greedy(batch), batch["input_ids"].shape[1]
        rope = self._rope_deltas()
        results = []
        for i, (q, im, row) in enumerate(zip(questions, images, out.sequences[:, n:].tolist(), strict=True)):
            text, new, truncated = self._answer(row)
            prompt = batch["input_ids"][i, batch["attention_mask"][i].bool()][None]  # padding cut off
            cache = _row_cache(out.cache, i, n - prompt.shape[1], n + len(new)) if keep_cache else None
            inputs = {"input_ids": prompt}
            if keep_cache and (cache is None or not self.pqpp.fast):  # scoring encodes the prompt: image needed
                inputs = self._encode(Dialog([(q, "")]), im, open_last=True)
            # Qwen-VL's rope offset of a row is that of its unpadded prompt (positions follow the attention mask).
            deltas = None if rope is None or cache is None else rope[i:i + 1]
            results.append((text, Prefix(inputs, prompt[0].tolist() + new, cache, deltas, truncated)))
        return results

    @torch.inference_mode()
    def fill_cache(self, prefix: Prefix) -> Prefix:
        """Give ``prefix`` the KV cache of its tokens, in place (every box of an answer reuses it).

        Built as generation builds it: the prompt (image included) in one forward, then the
        answer's tokens after it as text (a garbage answer may hold image-token ids, which
        a single forward would take for image tokens).
        """
        self._reset_rope()
        n = prefix.inputs["input_ids"].shape[1]
        cache = self.model(**prefix.inputs, use_cache=True).cache
        rope, new, dev = self._rope_deltas(), prefix.ids[n:], self._device
        if new:
            pos = _text_positions(torch.arange(n, n + len(new))[None], rope)
            self.model(input_ids=torch.tensor([new], device=dev), attention_mask=torch.ones(1, n + len(new), device=dev,
                       dtype=torch.long), position_ids=pos.to(dev), cache=cache, use_cache=True)  # extends cache
        prefix.cache, prefix.rope_deltas = cache, rope
        return prefix

    def _greedy(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                   do_sample=False, eos_token_id=self.adapter.end_id, pad_token_id=self.adapter.pad_id,
                                   return_dict_in_generate=True, use_cache=True)

    def _answer(self, new: list[int]) -> tuple[str, list[int], bool]:
        """``(text, ids, truncated)`` of a generated row: cut at its end token (a batch pads after it)."""
        end = self.adapter.end_id
        truncated = end not in new and len(new) >= self.max_new_tokens
        new = new[: new.index(end)] if end in new else new
        return self.adapter.tokenizer.decode(new, skip_special_tokens=False), new, truncated

    def _parse(self, text: str, size: tuple[int, int]) -> ParseResult:
        return self.adapter.fmt.parse(text, limits=self.adapter.coord_system().limits(size))

    def _to_pixels(self, values: Sequence[int], size: tuple[int, int]) -> np.ndarray:
        return self.adapter.coord_system().from_model(np.asarray(values, float), size)

    def _encode(self, dialog: Dialog, image: np.ndarray, open_last: bool) -> dict[str, torch.Tensor]:
        text = self.adapter.render(dialog, with_last_answer=not open_last)
        return {k: v.to(self._device) for k, v in self.adapter.model_inputs(text, image).items()}

    def _rope_deltas(self) -> torch.Tensor | None:
        return getattr(getattr(self.model, "model", None), "rope_deltas", None)

    @torch.inference_mode()
    def prefix_from_dialog(self, dialog: Dialog, image: np.ndarray, with_cache: bool = True) -> Prefix:
        """The prefix of a dialog whose turns are all answered, ending right after the last answer's text."""
        after, _, _ = self.adapter.turn_glue()
        inputs = self._encode(dialog, image, open_last=False)
        ids = inputs["input_ids"][0].tolist()
        glue = self.adapter.tokenizer.encode(after, add_special_tokens=False)
        if ids[len(ids) - len(glue):] != glue:
            raise RuntimeError("the rendered dialog does not end with the template's end-of-answer text")
        ids = ids[: len(ids) - len(glue)]
        trimmed = {k: (v[:, : len(ids)] if k in _PER_TOKEN else v) for k, v in inputs.items()}
        cache = None
        if with_cache:
            self._reset_rope()
            cache = self.model(**trimmed, use_cache=True).cache
        return Prefix(trimmed, ids, cache, self._rope_deltas())

    def _continuations(self, prefix: Prefix, questions: Sequence[str], start: int, split: bool = True
                       ) -> tuple[list[int], list[list[int]]]:
        """``(shared, per question)`` tokens from position ``start`` of the prefix to each answer's opening.

        ``shared`` is everything the questions have in common up to a word boundary (with the
        point last, all of a box's question text but the point), encoded once. The template
        text around a question ends and starts at special tokens, so it is tokenised once
        per predictor. The first question is checked against tokenising its whole text;
        a tokenizer that merges across a seam falls back to whole texts, nothing shared.
        ``split=False`` (the reference) tokenises every question's whole text.
        """
        tok = self.adapter.tokenizer
        after, pre_q, post_q = self.adapter.turn_glue()
        if self._glue_ids is None:
            self._glue_ids = (tok.encode(after + pre_q, add_special_tokens=False),
                              tok.encode(post_q, add_special_tokens=False))
        head, foot = self._glue_ids
        if split:
            stem = shared_stem(questions)
            whole = after + pre_q + questions[0] + post_q
            ids = tok([whole, stem, *(q[len(stem):] for q in questions)], add_special_tokens=False)["input_ids"]
            conts = [b + foot for b in ids[2:]]
            if head + ids[1] + conts[0] == ids[0]:
                return prefix.ids[start:] + head + ids[1], conts
        return prefix.ids[start:], tok([after + pre_q + q + post_q for q in questions],
                                       add_special_tokens=False)["input_ids"]

    def _yes_no(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        p = torch.softmax(logits.float(), -1)[:, [self.adapter.yes_id, self.adapter.no_id]].cpu().numpy()
        return p[:, 0], p[:, 1]

    @torch.inference_mode()
    def score_points(self, prefix: Prefix, questions: Sequence[str], fast: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``(P(Yes), P(No))`` (full-vocabulary softmax) for each question asked right after ``prefix``.

        ``fast``: one forward of all questions, packed, over a copy of the prefix cache.
        Otherwise the reference: one full, independent forward (image included) per question.
        """
        if not questions:
            return np.zeros(0), np.zeros(0)
        n_prompt = prefix.inputs["input_ids"].shape[1]
        if not fast:
            shared, conts = self._continuations(prefix, questions, n_prompt, split=False)
            rows = []
            for cont in conts:
                self._reset_rope()
                inputs = self.adapter.extend_inputs(prefix.inputs, prefix.ids[:n_prompt] + shared + cont)
                rows.append(self.model(**inputs).logits[0, -1])
            return self._yes_no(torch.stack(rows))
        if prefix.cache is None:
            self.fill_cache(prefix)  # e.g. a batch row whose sliding window dropped positions
        attn_impl = self.model.config._attn_implementation
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"fast PQPP scoring passes a custom 4-D attention mask, which {attn_impl!r} does not "
                             "take: load the model with attn_implementation=sdpa, or set pqpp.fast=false")
        cached = prefix.cache.get_seq_length()
        shared, conts = self._continuations(prefix, questions, cached)
        # One sequence: the shared text, then every question's own tokens back to back. Each
        # question sees the prefix, the shared text and itself (a block mask), and its positions
        # continue from the shared text, so it is scored exactly as if it had been asked alone.
        n_s, lens = len(shared), torch.tensor([len(c) for c in conts])
        ends = n_s + lens.cumsum(0)
        owner = torch.cat([torch.full((n_s,), -1), torch.repeat_interleave(torch.arange(len(conts)), lens)])
        sees = branch_visibility(owner.clamp(max=0), owner)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(1, 1, len(owner), cached + len(owner), dtype=dtype)
        mask[..., cached:].masked_fill_(~sees, torch.finfo(dtype).min)
        pos = _text_positions((cached + sees.sum(-1) - 1)[None], prefix.rope_deltas)  # each restarts after the stem
        dev = self._device
        out = self.model(input_ids=torch.tensor([shared + [t for c in conts for t in c]], device=dev),
                         attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         cache=_copy_cache(prefix.cache), use_cache=True, logits_to_keep=(ends - 1).to(dev))
        return self._yes_no(out.logits[0])

    @torch.inference_mode()
    def score_joint(self, prefix: Dialog, image: np.ndarray, question: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Official-code round 2: one question lists all points; the answer's k-th token is point k's label.

        Decoding is greedy over ``{Yes, No}`` only; probabilities come from the raw logits.
        """
        from transformers import LogitsProcessor, LogitsProcessorList

        allowed = torch.tensor([self.adapter.yes_id, self.adapter.no_id])

        class OnlyYesNo(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                keep = torch.full_like(scores, float("-inf"))
                keep[:, allowed] = scores[:, allowed]
                return keep

        self._reset_rope()
        inputs = self._encode(Dialog([*prefix.turns, (question, "")]), image, open_last=True)
        out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  logits_processor=LogitsProcessorList([OnlyYesNo()]), output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=self.adapter.pad_id)
        return self._yes_no(torch.cat(out.logits, 0))

    # --------------------------------------------------------------- public
    def segment(self, image: np.ndarray, expression: str, task: str = "res") -> SegmentResult:
        """Masks (one per target, none for no target), boxes, points, raw text and validity."""
        return self.segment_many([(image, expression, task)])[0]

    def segment_many(self, items: Sequence[tuple[np.ndarray, str, str]]) -> list[SegmentResult]:
        """:meth:`segment` for several ``(image, expression, task)``, round 1 generated as one batch.

        Each result's round-1 timing is its share of the batch's.
        """
        start = time.perf_counter()
        if self.variant == "ppg":
            questions = [ppg_dialog(expr, [], task, self.adapter.fmt).turns[0][0] for _, expr, task in items]
        else:
            questions = [box_question(expr, task) for _, expr, task in items]
        scored = self.variant == "pqpp" and self.pqpp.mode == "per_point"  # round 2 reads the prefix
        answers = self.generate_many(questions, [image for image, _, _ in items], keep_cache=scored)
        share = (time.perf_counter() - start) / max(len(items), 1)
        return [self._from_round1(image, expr, question, text, prefix, share)
                for (image, expr, _), question, (text, prefix) in zip(items, questions, answers, strict=True)]

    def _from_round1(self, image: np.ndarray, expression: str, question: str, text: str, prefix: Prefix,
                     round1: float) -> SegmentResult:
        """The rest of :meth:`segment` once round 1 has answered ``text``."""
        size = (int(image.shape[0]), int(image.shape[1]))
        start = time.perf_counter()
        parsed = self._parse(text, size)
        if parsed.valid and self.adapter.image_token_ids.intersection(prefix.ids[prefix.inputs["input_ids"].shape[1]:]):
            # Round 2 reads the answer back with the image, which would take the token for one of its own.
            parsed = ParseResult(reason="an image placeholder token in the answer")
        if not parsed.valid or parsed.no_target:
            return SegmentResult([], np.zeros((0, 4)), text=text, valid=parsed.valid, reason=parsed.reason,
                                 no_target=parsed.no_target, timings={"total": round1},
                                 truncated=prefix.truncated)
        boxes = np.stack([self._to_pixels(tg.box, size) for tg in parsed.targets])
        points, labels, confs = [], [], []
        if self.variant == "ppg":
            for tg in parsed.targets:
                points.append(self._to_pixels([v for p in tg.points for v in (p.x, p.y)], size).reshape(-1, 2))
                labels.append(np.array([int(p.inside) for p in tg.points], np.int64))
                confs.append(np.ones(len(tg.points)))
        elif self.variant == "pqpp":
            rng = np.random.default_rng([self.seed, zlib.crc32(expression.encode()), int(image.sum()) % 2**32])
            for tg, box in zip(parsed.targets, boxes, strict=True):
                pts_px = sample_points(box, size, self.pqpp, rng)
                pts = self.adapter.coord_system().to_model(pts_px.astype(float), size)
                if self.pqpp.mode == "joint":
                    q = joint_question(self.adapter.fmt, tg.box, [Point(int(x), int(y)) for x, y in pts])
                    p_yes, p_no = self.score_joint(Dialog([(question, text)]), image, q, len(pts))
                else:
                    qs = [point_question(self.adapter.fmt, tg.box, Point(int(x), int(y))) for x, y in pts]
                    p_yes, p_no = self.score_points(prefix, qs, fast=self.pqpp.fast)
                inside = p_yes > p_no
                conf = np.where(inside, p_yes, p_no)
                keep = self.pqpp.kept(inside, conf)  # low-confidence points are dropped; none left -> box only
                points.append(pts_px[keep].astype(float))
                labels.append(inside[keep].astype(np.int64))
                confs.append(conf[keep])
        round2 = time.perf_counter()
        self.segmenter.set_image(image)  # cached: a no-op when this image is already embedded
        masks = segment_targets(self.segmenter, boxes, points, labels)
        end = time.perf_counter()
        timings = {"round1": round1, "round2": round2 - start, "sam": end - round2, "total": round1 + end - start}
        return SegmentResult(masks, boxes, points, labels, confs, text, True, parsed.reason, False, timings,
                             prefix.truncated)
