"""SAM4MLLM: multi-modal LLMs that write Segment Anything prompts as plain text."""

import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The Hydra config tree lives beside the package in the repository (editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def trained_variant(variant: str) -> str:
    """The variant of the run that an evaluation of ``variant`` loads: box-only is a PQPP model's
    round 1 alone, so it reads a PQPP run; no run is trained as "box_only"."""
    return "pqpp" if variant == "box_only" else variant


OmegaConf.register_new_resolver("trained_variant", trained_variant, replace=True)  # configs/eval.yaml's default run

# A file's name without its folder and suffix (configs/predict.yaml names its output folder after the image).
OmegaConf.register_new_resolver("stem", lambda path: Path(str(path)).stem, replace=True)


def checkpoint_tag(checkpoint: object, default_run: object) -> str:
    """What an evaluation's folder adds to its name for weights other than the default run's final
    ones, so that scoring them never meets those predictions in one folder (``configs/eval.yaml``):
    ``@step-0001000`` (exported) or ``@best`` for the default run's other weights, ``@<run>`` for
    another run's final ones (``runs/pqpp-seed1/final``: ``@pqpp-seed1``), ``@<run>.step-0001000``
    or ``@<run>.best`` for its others, ``@<folder>`` for any other folder, ``@untrained`` for the
    untrained backbone."""
    if checkpoint is None:
        return "@untrained"
    path = Path(os.path.abspath(str(checkpoint)))
    if path.parent.name == "exported":  # scripts/export_checkpoint.py: run_dir/exported/step-N
        run, weights = path.parent.parent, path.name
    elif path.name in ("final", "best"):
        run, weights = path.parent, "" if path.name == "final" else path.name
    else:
        return f"@{path.name}"
    if run == Path(os.path.abspath(str(default_run))):
        return f"@{weights}" if weights else ""
    return f"@{run.name}" + (f".{weights}" if weights else "")


OmegaConf.register_new_resolver("checkpoint_tag", checkpoint_tag, replace=True)
