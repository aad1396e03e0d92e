"""The process group of a training run: joining it (DeepSpeed or plain torch, GPU or CPU ranks),
rank and world size, barriers and averages across ranks; DeepSpeed's checkpoint reads made safe."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block is ``weights_only=True``, with four DeepSpeed classes allowed.

    DeepSpeed's readers (resume, ``zero_to_fp32``) pass ``weights_only=False``, under which a tampered
    checkpoint runs any code it holds. CPU runs' ZeRO-2/3 checkpoints hold ``LossScaler``, ``ZeroStageEnum``
    and ``fragment_address``; ``DynamicLossScaler`` (fp16) is allowed unseen. A file needing any other
    class fails, naming it.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    load = torch.load

    def weights_only(*args: Any, **kwargs: Any) -> Any:
        return load(*args, **{**kwargs, "weights_only": True})

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]), \
            mock.patch.object(torch, "load", weights_only):
        yield


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from ``/dev/shm``.

    DeepSpeed maps one ~70 MB shared-memory buffer per rank and never unlinks it, so every
    CPU run used to leave them in RAM-backed ``/dev/shm`` (hundreds of runs filled 14 GB
    here). Once every rank is past initialisation (the barrier) all buffers are mapped
    everywhere; the mappings outlive the name, and a killed run then leaks nothing.
    """
    barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")  # as shm.cpp reads them
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{torch.distributed.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def init_distributed(use_deepspeed: bool, device: torch.device) -> None:
    """Join the launcher's process group (nccl on GPUs, gloo on CPU ranks) through DeepSpeed when it is
    used, or plain torch when ``WORLD_SIZE`` > 1; one process without DeepSpeed needs no group."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not use_deepspeed:
        return
    on_gpu = device.type == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    if use_deepspeed:
        if not on_gpu:  # model.device=cpu on a GPU machine: DeepSpeed would otherwise pick CUDA itself
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from sam4mllm.training.launch import env_tools_first, free_port

        env_tools_first()  # the same ninja builds DeepSpeed's ops whichever shell started the run
        if "RANK" not in os.environ:  # `python scripts/train.py` without a launcher: a group of one
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port())})
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if not on_gpu:
            _unlink_shm_buffer()
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    if on_gpu:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores: without this each takes them all and they thrash (4x slower here).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world())))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def mean_across_ranks(values: list[float]) -> list[float]:
    """Each value averaged over the ranks."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= world()
    return t.tolist()
