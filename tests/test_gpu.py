"""GPU-only checks (pytest -m gpu); skipped without CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_7b_qwen2vl_lora_r256_step_fits_and_runs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from train_step import gpu_7b_lora_step

    r = gpu_7b_lora_step()
    assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] < torch.cuda.get_device_properties(0).total_memory / 2**30
