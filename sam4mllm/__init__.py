"""SAM4MLLM: multi-modal LLMs that write Segment Anything prompts as plain text."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree lives beside the package in the repository (editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
