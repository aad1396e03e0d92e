"""Shared fixtures: a small synthetic benchmark written once per test session."""

from __future__ import annotations

import os

import pytest

from sam4mllm.data.synthetic import SyntheticConfig, SyntheticReport, generate_synthetic

os.environ.setdefault("WANDB_MODE", "disabled")

SMALL = SyntheticConfig(
    seed=3,
    images={"train": 10, "val": 8, "testA": 4, "testB": 4},
    reason_images={"train": 3, "val": 8, "test": 3},
    ignore_fraction=0.6,
)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticReport:
    """The small synthetic benchmark under a temporary ``data/synthetic``."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return generate_synthetic(root, SMALL)
