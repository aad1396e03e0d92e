"""Where models run: one rule for the MLLM, the segmenters and the trainer."""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import OmegaConf


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


def config_on_device(part: Any) -> dict[str, Any]:
    """A model's config as a plain dict, its ``device`` resolved to the kind of device that runs it.

    For the headers of resumable outputs: predictions and labels made on a GPU and on the CPU
    differ slightly, so a resume on the other kind of machine must not mix them into one file
    under ``auto``, while ``auto`` and ``cpu`` on one CPU machine are the same configuration.
    The GPU index is left out: the shards of one job run on different GPUs.
    """
    out = OmegaConf.to_container(part, resolve=True)
    if "device" in out:
        out["device"] = resolve_device(out["device"]).type
    return out
