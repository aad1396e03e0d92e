"""Shared fixtures: a small synthetic benchmark written once per test session."""

from __future__ import annotations

import os

# Under xdist each worker shares the cores with the others (`make test`: 2 workers, 2
# cores); torch's default of one OpenMP thread per core per process oversubscribes them
# (measured: 10 min 53 s for the suite, against 4.5-7 min with one thread). One thread per
# worker, inherited by the training and evaluation processes tests launch, unless the user sets it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def workspace(synthetic, tmp_path_factory):
    """A session output folder holding PPG and PQPP labels of the small synthetic benchmark.

    Returns ``compose(name, *overrides)`` for configs pointed at it (tiny models are
    built into it on first use).
    """
    from hydra import compose, initialize_config_dir

    from sam4mllm import CONFIG_DIR
    from sam4mllm.labels import generate_labels

    out = tmp_path_factory.mktemp("outputs")
    base = [f"paths.data_dir={synthetic.root.parent}", f"paths.output_dir={out}"]

    def make(name: str, *overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=[*base, *overrides])

    for variant in ("ppg", "pqpp"):
        for dataset in ("synthetic", "synthetic_gres"):
            generate_labels(make("gen_labels", f"+exp={variant}", f"dataset={dataset}", "progress=false",
                                  "overlays=0"))
    make.out = out  # type: ignore[attr-defined]
    make.base = base  # type: ignore[attr-defined]
    return make
