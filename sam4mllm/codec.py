"""SAM prompts <-> plain text, with no new tokens.

A *target* is a box plus ``K`` points ``(x, y, inside)`` -- the paper's
``Prompt_B in N^4`` and ``Prompt_P in N^{K x 3}``. Values are integers in the
backbone's coordinate system (see :mod:`sam4mllm.coords`); the codec never converts
coordinates, it only writes and reads them.

Formats (``get_format(name)``):

=========  ===========================================================  ==============
name       one target                                                   used by
=========  ===========================================================  ==============
official   ``[012,034,567,890] (100,200,1) (150,250,1) (020,040,0)``    paper code
qwen2vl    ``<|box_start|>(12,34),(567,890)<|box_end|> (100,200,1)``    Qwen2/3-VL
qwenvl     ``<box>(12,34),(567,890)</box> (100,200,1)``                 Qwen-VL v1
json       ``[{"bbox_2d": [12, 34, 567, 890], "point_2d": [[100, 200, 1]]}]``  Qwen2.5-VL
=========  ===========================================================  ==============

Several targets are written one after another separated by a space (official code);
points belong to the box written before them. No target is a fixed phrase
(``No object found.`` by default).

:meth:`PromptFormat.parse` never raises: it returns a :class:`ParseResult` whose
``valid`` flag and ``reason`` say what happened, and whose ``flags`` record every
repair (clamped values, swapped corners, unclosed tokens, orphan points).
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

NUM = r"[-+]?\d+(?:\.\d+)?"
LABEL = r"[01]|yes|no|true|false|pos|neg"
_TRUE_LABELS = {"1", "yes", "true", "pos"}

NO_TARGET_PHRASES = (
    "no object found",
    "object not in the image",
    "not in the image",
    "no target",
    "no object",
)


@dataclass(frozen=True)
class Point:
    """A prompt point: integer ``(x, y)`` in model units, ``inside`` the object or not."""

    x: int
    y: int
    inside: bool = True


@dataclass(frozen=True)
class TargetPrompt:
    """One target: an ``XYXY`` box in model units plus its points."""

    box: tuple[int, int, int, int]
    points: tuple[Point, ...] = ()


@dataclass(frozen=True)
class ParseResult:
    """What a model's text said.

    ``valid`` is False when nothing usable was found (``reason`` says why); a valid
    result either has ``targets`` or ``no_target=True``. ``flags`` name repairs.
    """

    targets: tuple[TargetPrompt, ...] = ()
    no_target: bool = False
    valid: bool = False
    reason: str = "empty output"
    flags: tuple[str, ...] = field(default_factory=tuple)


def _to_int(s: str) -> int:
    v = float(s)
    if not math.isfinite(v):  # a 400-digit number: keep its sign, clamping will flag it
        v = math.copysign(1e18, v)
    return math.floor(v + 0.5)


class _Repairs:
    """Collects flags while values are clamped and corners put in order."""

    def __init__(self, limits: tuple[int, int]) -> None:
        self.max_x, self.max_y = limits
        self.flags: list[str] = []

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def clamp(self, v: int, hi: int) -> int:
        if v < 0 or v > hi:
            self.flag("clamped")
            return min(max(v, 0), hi)
        return v

    def point(self, x: str, y: str, label: str | None) -> Point:
        if label is None:
            self.flag("unlabelled_point")
        inside = label is None or label.lower() in _TRUE_LABELS
        return Point(self.clamp(_to_int(x), self.max_x), self.clamp(_to_int(y), self.max_y), inside)

    def box(self, vals: Sequence[str]) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = (_to_int(v) for v in vals)
        if x1 > x2 or y1 > y2:
            self.flag("swapped_corners")
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
        return (
            self.clamp(x1, self.max_x),
            self.clamp(y1, self.max_y),
            self.clamp(x2, self.max_x),
            self.clamp(y2, self.max_y),
        )


class PromptFormat(ABC):
    """Writes and reads targets as text. Subclasses define the box and point syntax."""

    name: str = ""
    no_target_text: str = "No object found."
    # A regex with 4 numeric groups and a final optional group that matched the closer.
    box_re: re.Pattern[str]
    point_re = re.compile(rf"\(\s*({NUM})\s*,\s*({NUM})\s*(?:,\s*({LABEL})\s*)?(\))?", re.IGNORECASE)

    @abstractmethod
    def box_text(self, box: Sequence[int]) -> str:
        """Text of one box."""

    def point_text(self, x: int, y: int, inside: bool | None = None) -> str:
        """Text of one point; ``inside=None`` writes it unlabelled (a PQPP question)."""
        label = "" if inside is None else f",{int(inside)}"
        return f"({x},{y}{label})"

    def target_text(self, target: TargetPrompt) -> str:
        """Text of one target: its box, then its points."""
        parts = [self.box_text(target.box)]
        parts += [self.point_text(p.x, p.y, p.inside) for p in target.points]
        return " ".join(parts)

    def encode(self, targets: Sequence[TargetPrompt]) -> str:
        """Text for zero or more targets; zero targets gives :attr:`no_target_text`."""
        if not targets:
            return self.no_target_text
        return " ".join(self.target_text(t) for t in targets)

    def parse(self, text: str, limits: tuple[int, int] = (999, 999)) -> ParseResult:
        """Read targets out of model text. Never raises; see :class:`ParseResult`.

        ``limits`` are the largest valid ``(x, y)``; values outside ``[0, limit]`` are
        clamped and flagged ``clamped``.
        """
        try:
            return self._parse(text if isinstance(text, str) else str(text), limits)
        except Exception as err:  # the contract is "never raises": report instead
            return ParseResult(reason=f"parser error: {type(err).__name__}: {err}")

    # -- internals -------------------------------------------------------------------
    def _boxes(self, text: str) -> list[tuple[int, int, list[str], bool]]:
        """``(start, end, values, closed)`` for each box found, in order."""
        return [(m.start(), m.end(), list(m.groups()[:4]), m.groups()[4] is not None)
                for m in self.box_re.finditer(text)]

    def _points(self, text: str) -> list[tuple[int, str, str, str | None]]:
        """``(start, x, y, label)`` for each point found in ``text`` (boxes blanked)."""
        return [(m.start(), m.group(1), m.group(2), m.group(3)) for m in self.point_re.finditer(text)]

    def _parse(self, text: str, limits: tuple[int, int]) -> ParseResult:
        if not text.strip():
            return ParseResult(reason="empty output")
        rep = _Repairs(limits)
        boxes = self._boxes(text)
        # Points are searched with boxes blanked out, since some box syntaxes contain "(x,y)".
        blanked = list(text)
        for start, end, _, _ in boxes:
            blanked[start:end] = " " * (end - start)
        points = self._points("".join(blanked))
        mentions_none = any(p in text.lower() for p in NO_TARGET_PHRASES)
        if not boxes:
            if mentions_none:
                if points:
                    rep.flag("orphan_points")
                return ParseResult(no_target=True, valid=True, reason="ok", flags=tuple(rep.flags))
            return ParseResult(reason="no box found", flags=("orphan_points",) if points else ())
        if mentions_none:
            rep.flag("mixed_no_target")
        targets: list[TargetPrompt] = []
        for i, (start, _end, vals, closed) in enumerate(boxes):
            if not closed:
                rep.flag("unclosed")
            nxt = boxes[i + 1][0] if i + 1 < len(boxes) else len(text)
            mine = [rep.point(x, y, lab) for (pos, x, y, lab) in points if start < pos < nxt]
            targets.append(TargetPrompt(rep.box(vals), tuple(mine)))
        if points and points[0][0] < boxes[0][0]:
            rep.flag("orphan_points")
        return ParseResult(tuple(targets), no_target=False, valid=True, reason="ok", flags=tuple(rep.flags))


class OfficialFormat(PromptFormat):
    """The paper code's ``[x1,y1,x2,y2]`` with 3-digit zero padding and ``(x,y,l)`` points."""

    name = "official"
    box_re = re.compile(rf"\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*(\])?")

    def box_text(self, box: Sequence[int]) -> str:
        return "[" + ",".join(f"{int(v):03d}" for v in box) + "]"

    def point_text(self, x: int, y: int, inside: bool | None = None) -> str:
        label = "" if inside is None else f",{int(inside)}"
        return f"({x:03d},{y:03d}{label})"


def _pair_box_re(open_tok: str, close_tok: str) -> re.Pattern[str]:
    o, c = re.escape(open_tok), re.escape(close_tok)
    return re.compile(
        rf"{o}\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*,?\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*({c})?"
    )


class Qwen2VLFormat(PromptFormat):
    """Qwen2-VL / Qwen3-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on the 0..999 grid."""

    name = "qwen2vl"
    box_re = _pair_box_re("<|box_start|>", "<|box_end|>")

    def box_text(self, box: Sequence[int]) -> str:
        x1, y1, x2, y2 = (int(v) for v in box)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


class QwenVLFormat(PromptFormat):
    """Qwen-VL v1: ``<box>(x1,y1),(x2,y2)</box>`` on the 0..999 grid."""

    name = "qwenvl"
    box_re = _pair_box_re("<box>", "</box>")

    def box_text(self, box: Sequence[int]) -> str:
        x1, y1, x2, y2 = (int(v) for v in box)
        return f"<box>({x1},{y1}),({x2},{y2})</box>"


class JsonFormat(PromptFormat):
    """Qwen2.5-VL style JSON: ``[{"bbox_2d": [...], "point_2d": [[x, y, 1], ...]}]``.

    Read with regexes, not ``json.loads``, so that surrounding prose, code fences and a
    missing closing bracket do not lose the answer. A ``[x, y]`` point without a label
    is taken as positive (the Seg-Zero convention) and flagged ``unlabelled_point``.
    """

    name = "json"
    box_re = re.compile(
        rf"\"bbox_2d\"\s*:\s*\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*(\])?"
    )
    # Boxes are blanked before points are read, so any remaining ``[x, y(, l)]`` is a point.
    point_re = re.compile(rf"\[\s*({NUM})\s*,\s*({NUM})\s*(?:,\s*({LABEL})\s*)?(\])?", re.IGNORECASE)

    def box_text(self, box: Sequence[int]) -> str:
        return json.dumps([int(v) for v in box])

    def point_text(self, x: int, y: int, inside: bool | None = None) -> str:
        return json.dumps([int(x), int(y)] + ([] if inside is None else [int(inside)]))

    def target_text(self, target: TargetPrompt) -> str:
        obj: dict[str, object] = {"bbox_2d": [int(v) for v in target.box]}
        if target.points:
            obj["point_2d"] = [[p.x, p.y, int(p.inside)] for p in target.points]
        return json.dumps(obj)

    def encode(self, targets: Sequence[TargetPrompt]) -> str:
        if not targets:
            return self.no_target_text
        return "[" + ", ".join(self.target_text(t) for t in targets) + "]"


FORMATS: dict[str, PromptFormat] = {
    f.name: f for f in (OfficialFormat(), Qwen2VLFormat(), QwenVLFormat(), JsonFormat())
}


def get_format(name: str) -> PromptFormat:
    """The registered :class:`PromptFormat` called ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown prompt format {name!r}; choose one of {sorted(FORMATS)}") from None
