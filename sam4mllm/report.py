"""Plain-text tables for summaries and results."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(v: object, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 4) -> str:
    """A GitHub markdown table; ``None`` prints as ``-`` and floats with ``digits`` decimals."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    return "\n".join([line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
