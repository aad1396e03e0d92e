"""SAM4MLLM dialogs: what the user asks and what the assistant answers, as text turns.

* **PPG** -- one turn: the expression in, box + points per target out.
* **PQPP** -- round 1: the expression in, a box per target out. Round 2 asks about
  points in each box, either one question per point answered ``Yes``/``No`` (the
  paper) or all points of a box in one turn answered by the labels run together,
  e.g. ``NoYesYes`` (the official code).
* **GRES** -- several targets are written one after another; no target is the codec's
  no-target phrase and has no round 2.
* **VQA** -- the question in, the short answer out.

Coordinates here are already in the backbone's integer units (see
:mod:`sam4mllm.coords`); the codec formats them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from sam4mllm.codec import Point, PromptFormat, TargetPrompt

BOX_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes ({n}): "{expr}"'
PPG_PROMPT = ('Please provide the bounding box and the prompt points of the region this sentence describes '
              '({n}): "{expr}"')
# The point comes last so that the text every question of a box shares is a common
# prefix: fast PQPP encodes it once per box and only the point per question.
POINT_PROMPT = "Is this point located on the object with coordinates {box}? {point}"
JOINT_PROMPT = "Check if the points listed below are located on the object with coordinates {box}:\n{points}"
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
YES, NO = "Yes", "No"
# per_point: one dialog, every point a turn after the box (paper); joint: one turn lists all of a
# box's points (official code); branch: per_point's turns, each trained as if asked alone (see
# ``Adapter.encode_branched``).
PQPP_MODES = ("per_point", "joint", "branch")


@dataclass
class Dialog:
    """User/assistant turn pairs; the image goes with the first user turn."""

    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, with_answers: bool = True) -> list[dict[str, object]]:
        """Chat messages in the ``transformers`` chat-template layout."""
        out: list[dict[str, object]] = []
        for k, (user, answer) in enumerate(self.turns):
            content: list[dict[str, str]] = [{"type": "image"}] if k == 0 else []
            out.append({"role": "user", "content": [*content, {"type": "text", "text": user}]})
            if with_answers:
                out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return out


def count_hint(task: str) -> str:
    """The official ``(N)`` hint: ``1`` for one target, ``0+`` for gRefCOCO-style data."""
    return "0+" if task == "gres" else "1"


def ppg_dialog(expression: str, targets: Sequence[TargetPrompt], task: str, fmt: PromptFormat) -> Dialog:
    """One turn: box and labelled points of every target (or the no-target phrase)."""
    return Dialog([(PPG_PROMPT.format(n=count_hint(task), expr=expression), fmt.encode(targets))])


def box_question(expression: str, task: str) -> str:
    """PQPP round 1's question (also the box-only prompt)."""
    return BOX_PROMPT.format(n=count_hint(task), expr=expression)


def point_question(fmt: PromptFormat, box: Sequence[int], point: Point) -> str:
    """PQPP per-point question about one point of one box."""
    return POINT_PROMPT.format(point=fmt.point_text(point.x, point.y), box=fmt.box_text(box))


def joint_question(fmt: PromptFormat, box: Sequence[int], points: Sequence[Point]) -> str:
    """PQPP joint question listing every point of one box (official code)."""
    return JOINT_PROMPT.format(box=fmt.box_text(box), points=" ".join(fmt.point_text(p.x, p.y) for p in points))


def yes_no(inside: bool) -> str:
    """The answer word for one point."""
    return YES if inside else NO


def shared_stem(questions: Sequence[str]) -> str:
    """The text several questions share, cut at a word boundary (empty for one question)."""
    stem = os.path.commonprefix(list(questions)) if len(questions) > 1 else ""  # noqa: RUF071 (text)
    return stem[: max(stem.rfind(" "), 0)]


def point_turns(targets: Sequence[TargetPrompt], fmt: PromptFormat) -> list[list[tuple[str, str]]]:
    """PQPP round 2 per point: the ``(question, answer)`` turns of each target's points."""
    return [[(point_question(fmt, t.box, p), yes_no(p.inside)) for p in t.points] for t in targets]


def pqpp_dialog(
    expression: str, targets: Sequence[TargetPrompt], task: str, fmt: PromptFormat, mode: str = "per_point"
) -> Dialog:
    """Round 1 (boxes) then round 2 (points of each box), per point or jointly (``branch``: per point)."""
    if mode not in PQPP_MODES:
        raise ValueError(f"unknown PQPP dialog mode {mode!r}: use one of {PQPP_MODES}")
    boxes_only = [TargetPrompt(t.box) for t in targets]
    turns = [(box_question(expression, task), fmt.encode(boxes_only))]
    if mode == "joint":
        turns += [(joint_question(fmt, t.box, t.points), "".join(yes_no(p.inside) for p in t.points))
                  for t in targets]
    else:
        turns += [turn for group in point_turns(targets, fmt) for turn in group]
    return Dialog(turns)


def vqa_dialog(question: str, answer: str) -> Dialog:
    """One VQA turn."""
    return Dialog([(VQA_PROMPT.format(question=question), answer)])
