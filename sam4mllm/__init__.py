"""SAM4MLLM: multi-modal LLMs that write Segment Anything prompts as plain text."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The Hydra config tree lives beside the package in the repository (editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# The training run an evaluation loads by default (configs/eval.yaml): box-only is a PQPP
# model's round 1 alone, so it reads the PQPP run; no run is trained as "box_only".
OmegaConf.register_new_resolver("trained_variant", lambda variant: "pqpp" if variant == "box_only" else variant,
                                replace=True)
# A file's name without its folder and suffix (configs/predict.yaml names its output folder after the image).
OmegaConf.register_new_resolver("stem", lambda path: Path(str(path)).stem, replace=True)


def checkpoint_tag(checkpoint: object) -> str:
    """What an evaluation's folder adds to its name for weights other than a run's final ones (an
    exported step: ``@step-0001000``; the untrained backbone: ``@untrained``), so that scoring them
    never meets the final weights' predictions in one folder (``configs/eval.yaml``)."""
    if checkpoint is None:
        return "@untrained"
    name = Path(str(checkpoint)).name
    return "" if name == "final" else f"@{name}"


OmegaConf.register_new_resolver("checkpoint_tag", checkpoint_tag, replace=True)
