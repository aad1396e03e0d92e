"""Official metrics: cIoU, gIoU, gRefCOCO N-acc / T-acc / Pr@X, ReasonSeg ignore, VQAv2 accuracy.

Segmentation, per sample (one sentence), at the original image resolution, after
removing ``ignore`` pixels from both masks: ``I = |pred & gt|``, ``U = |pred | gt|``.

* ``cIoU = sum(I) / sum(U)`` over the split (1.0 if every ``U`` is 0).
* ``gIoU = mean(I / U)``, a sample with ``U == 0`` (prediction and ground truth both
  empty) scoring 1 (LISA convention).

gRefCOCO rules (GRES official code), which read an explicit "no target" prediction (for
an MLLM, its no-target answer; ``score_sample(..., no_target=...)``): a no-target sample
predicted "no target" scores 1 and adds nothing to the sums; predicted anything else (a
mask, a box whose mask is empty, an unparseable answer) it scores 0 and adds its mask's
area to ``sum(U)``; a target sample predicted "no target" scores 0 and adds the target's
area to ``sum(U)``. ``N-acc`` is the share of no-target samples predicted "no target",
``T-acc`` the share of target samples predicted otherwise, and ``Pr@t`` the share of
*target* samples with ``I / U >= t``. Without an explicit prediction (``no_target=None``:
the other tasks, and mask-only predictors) a prediction is "no target" when its mask is
empty, which is the LISA convention above.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PR_THRESHOLDS = (0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SampleScore:
    """Per-sample intersection and union (ignore pixels removed) and emptiness."""

    intersection: int
    union: int
    gt_empty: bool
    pred_no_target: bool

    @property
    def iou(self) -> float:
        """``I / U``; a no-target sample scores 1 when predicted "no target", else 0."""
        if self.gt_empty:
            return float(self.pred_no_target)
        return self.intersection / self.union if self.union else 1.0


def score_sample(pred: np.ndarray | None, gt: np.ndarray | None, ignore: np.ndarray | None = None,
                 no_target: bool | None = None) -> SampleScore:
    """Score one prediction. ``pred``/``gt`` are ``HxW`` bool masks; ``None`` means empty.

    ``no_target``: whether the prediction says "no target" (gRefCOCO's explicit prediction);
    ``None``: when its mask is empty.
    """
    shape = next((m.shape for m in (gt, pred, ignore) if m is not None), None)
    if shape is None:
        return SampleScore(0, 0, True, True if no_target is None else no_target)
    for name, m in (("prediction", pred), ("ground truth", gt), ("ignore", ignore)):
        if m is not None and m.shape != shape:
            raise ValueError(f"{name} mask is {m.shape}, expected {shape}: IoU is computed at the original resolution")
    p = np.zeros(shape, bool) if pred is None else pred.astype(bool)
    g = np.zeros(shape, bool) if gt is None else gt.astype(bool)
    gt_empty = not g.any()
    said_none = not p.any() if no_target is None else no_target
    if ignore is not None:
        keep = ~ignore.astype(bool)
        p, g = p & keep, g & keep
    return SampleScore(int((p & g).sum()), int((p | g).sum()), gt_empty, said_none)


def said_no_target(answered: Any, task: str) -> bool | None:
    """What a prediction that ``answered`` (truthy) the no-target answer predicts, for
    :func:`score_sample`: gRefCOCO scores that answer (GRES official code), not an empty mask, so an
    unparseable answer or a box whose mask came out empty is not "no target". Other tasks: ``None``
    (the mask decides, LISA convention)."""
    return bool(answered) if task == "gres" else None


@dataclass
class SegmentationMeter:
    """Accumulates :class:`SampleScore` s and reports the official figures.

    ``valid=False`` marks a sample whose model output could not be parsed; it is scored
    with whatever mask the caller passes (normally none) and counted in ``invalid_rate``.
    """

    scores: list[SampleScore] = field(default_factory=list)
    invalid: int = 0

    def update(
        self, pred: np.ndarray | None, gt: np.ndarray | None, ignore: np.ndarray | None = None, valid: bool = True,
        no_target: bool | None = None,
    ) -> SampleScore:
        """Score and record one sample (``no_target``: see :func:`score_sample`)."""
        s = score_sample(pred, gt, ignore, no_target)
        self.add(s, valid)
        return s

    def add(self, score: SampleScore, valid: bool = True) -> None:
        """Record an already computed score (e.g. re-read from a predictions file)."""
        self.scores.append(score)
        self.invalid += not valid

    def items(self) -> Iterator[tuple[str, float | int | None]]:
        """``(name, value)`` pairs; a rate over an empty population is ``None``."""
        n = len(self.scores)
        total_i = sum(s.intersection for s in self.scores)
        total_u = sum(s.union for s in self.scores)
        targets = [s for s in self.scores if not s.gt_empty]
        empties = [s for s in self.scores if s.gt_empty]
        yield "n", n
        yield "cIoU", (total_i / total_u if total_u else 1.0) if n else None
        yield "gIoU", float(np.mean([s.iou for s in self.scores])) if n else None
        yield "N-acc", (sum(s.pred_no_target for s in empties) / len(empties)) if empties else None
        yield "T-acc", (sum(not s.pred_no_target for s in targets) / len(targets)) if targets else None
        for t in PR_THRESHOLDS:
            yield f"Pr@{t}", (sum(s.iou >= t for s in targets) / len(targets)) if targets else None
        yield "n_no_target", len(empties)
        yield "invalid_rate", self.invalid / n if n else None

    def compute(self) -> dict[str, float | int | None]:
        """All figures as a dict."""
        return dict(self.items())


# ---------------------------------------------------------------------------- VQAv2
_CONTRACTIONS_TEXT = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""
CONTRACTIONS = dict(tok.split(":", 1) for tok in _CONTRACTIONS_TEXT.split())
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official tool passes re.UNICODE (32) as the *count* argument: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, 32)


def _digits_articles(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official answer normalisation (punctuation, then digits/articles/contractions)."""
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its (usually 10) human answers.

    For each human answer ``j``: ``min(1, #matches among the other answers / 3)``;
    the mean over ``j``. Normalisation applies only when the human answers differ.
    """
    clean = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(clean)) > 1:
        clean = [normalize_vqa_answer(a) for a in clean]
        pred = normalize_vqa_answer(pred)
    accs = []
    for j in range(len(clean)):
        others = clean[:j] + clean[j + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return float(np.mean(accs)) if accs else 0.0


@dataclass
class VQAMeter:
    """Mean VQAv2 accuracy x 100 over a split."""

    accs: list[float] = field(default_factory=list)

    def update(self, prediction: str, answers: Sequence[str]) -> float:
        """Score and record one question."""
        a = vqa_accuracy(prediction, answers)
        self.accs.append(a)
        return a

    def compute(self) -> dict[str, float | int | None]:
        """``{"n", "accuracy"}`` with accuracy in percent."""
        return {"n": len(self.accs), "accuracy": 100.0 * float(np.mean(self.accs)) if self.accs else None}
