"""Errors raised for missing, partial or corrupt data, each saying how to fix it."""

from __future__ import annotations

from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file or folder is missing; the message names the path, layout and fix."""

    def __init__(self, dataset: str, missing: Path, layout: str) -> None:
        self.dataset, self.missing = dataset, Path(missing)
        if dataset.startswith("synthetic"):
            fix = "Generate it with:  python scripts/prepare_data.py dataset=synthetic"
        else:
            fix = (
                "Download it as described in data/README.md, then check the layout with:\n"
                f"  python scripts/prepare_data.py dataset={dataset}"
            )
        super().__init__(
            f"{dataset}: expected {self.missing} but it does not exist.\n"
            f"Expected layout:\n{layout.rstrip()}\n{fix}"
        )


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""


class MalformedSampleError(ValueError):
    """A sample's files disagree with its annotations, or an annotation is broken (an image or RLE
    of another size, a polygon vertex that is not a finite number, a missing ``bbox``)."""


# What reading one sample can raise on bad data: jobs count and report it, and go on.
UNREADABLE = (CorruptImageError, MalformedSampleError, FileNotFoundError)


def require(dataset: str, layout: str, *paths: Path) -> None:
    """Raise :class:`DatasetNotFoundError` for the first of ``paths`` that does not exist."""
    for p in paths:
        if not Path(p).exists():
            raise DatasetNotFoundError(dataset, Path(p), layout)
