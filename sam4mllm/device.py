"""Where models run: one rule for the MLLM, the segmenters and the trainer."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this process's GPU (``cuda:$LOCAL_RANK``) when CUDA is available, else the CPU.

    Anything else ("cpu", "cuda:1") is taken as given. ``auto`` is every config's default, so a
    GPU machine uses its GPU and each rank of a launched job (training, sharded evaluation) its own.
    """
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
