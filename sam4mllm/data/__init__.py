"""Datasets: one :class:`Sample` type, loaders for the official layouts, the synthetic benchmark."""

from __future__ import annotations

from typing import Any

from sam4mllm.config import build
from sam4mllm.data.base import Sample, SegDataset
from sam4mllm.data.errors import CorruptImageError, DatasetNotFoundError, MalformedSampleError

__all__ = ["CorruptImageError", "DatasetNotFoundError", "MalformedSampleError", "Sample", "SegDataset", "build_dataset"]


def build_dataset(dataset_cfg: Any, split: str | None = None) -> SegDataset:
    """Instantiate the loader of a ``dataset/`` config for ``split`` (default: the config's split)."""
    split = split or dataset_cfg.split
    if split not in dataset_cfg.splits:
        raise ValueError(f"{dataset_cfg.name} has no split {split!r}; choose one of {list(dataset_cfg.splits)}")
    return build(dataset_cfg.loader, split=split)
