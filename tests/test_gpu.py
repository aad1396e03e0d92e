"""GPU-only checks (pytest -m gpu); skipped without CUDA.

The CUDA paths must give the CPU's numbers. TF32 is off in this process and, through
NVIDIA_TF32_OVERRIDE, in the processes it launches, so float32 agrees to rounding.
"""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_7b_qwen2vl_lora_r256_step_fits_and_runs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from train_step import gpu_7b_lora_step

    r = gpu_7b_lora_step()
    print(f"\n7B LoRA r=256 ZeRO-2 step: {r}")
    assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] < torch.cuda.get_device_properties(0).total_memory / 2**30


def test_model_and_points_round_on_cuda_answer_as_on_the_cpu(workspace):
    """`model.device=auto` puts the MLLM on the GPU; its greedy box answers (one question, and a
    left-padded batch of two), and P(Yes)/P(No) of the points round (fast shared-prefix and one
    forward per point; after the batch, from its row of the batch's cache), match the CPU's."""
    from sam4mllm.codec import Point, TargetPrompt
    from sam4mllm.dialogs import Dialog, box_question, point_question
    from sam4mllm.inference import Sam4MLLM
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    image = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)
    pts = np.random.default_rng(1).integers(0, 999, (25, 2))
    runs = {}
    for device in ("cpu", "auto"):
        adapter = instantiate(workspace("train", "+exp=pqpp", f"model.device={device}").model)
        m = Sam4MLLM(adapter, GrabCutSegmenter())
        qs = [point_question(adapter.fmt, (10, 20, 500, 600), Point(int(x), int(y))) for x, y in pts]
        box = adapter.fmt.encode([TargetPrompt((10, 20, 500, 600))])
        given = Dialog([(box_question("the red circle", "res"), box)])
        prefix = m.prefix_from_dialog(given, image)
        text, generated = m.generate(box_question("the blue square", "res"), image, keep_cache=True)
        batch = m.generate_many([box_question("the blue square", "res"), box_question("a red circle", "res")],
                                [image, image[:56]], keep_cache=True)
        assert batch[1][1].cache is not None  # the row, not the prompt encoded again
        runs[next(adapter.model.parameters()).device.type] = (
            [text] + [t for t, _ in batch], m.score_points(prefix, qs, fast=True),
            m.score_points(prefix, qs, fast=False), m.score_points(generated, qs, fast=True),
            m.score_points(batch[1][1], qs, fast=True))
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu[0] == cpu[0] and gpu[0][1] == gpu[0][0]  # the batch's first answer is the one asked alone
    for c, g in zip(cpu[1:], gpu[1:], strict=True):
        np.testing.assert_allclose(g, c, atol=1e-4)
    np.testing.assert_allclose(gpu[1], gpu[2], atol=1e-4)
    assert gpu[1][0].std() > 0


def test_training_on_cuda_gives_the_golden_cpu_losses_and_the_launcher_agrees(workspace, tmp_path):
    """Plain PyTorch on the GPU repeats the CPU's pinned first losses; `deepspeed scripts/train.py`
    (ZeRO-2, one GPU rank, as users type it) follows the plain run step for step."""
    from test_training import GOLDEN, _cfg, _deepspeed, _losses

    from sam4mllm.training.trainer import train

    torch.cuda.reset_peak_memory_stats()
    hist = train(_cfg(workspace, tmp_path / "plain", "train.max_steps=3", "save_final=false"))
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    assert [h["loss"] for h in hist] == pytest.approx(GOLDEN, abs=1e-4)

    same = ["train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum=2", "train.optimizer.lr=1e-3",
            "train.lora.dropout=0"]
    r = _deepspeed(workspace, tmp_path / "ds", 1, *same, "save_final=false")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "stage: 2" in (tmp_path / "ds" / "config.yaml").read_text()
    ds = _losses(tmp_path / "ds")
    plain = train(_cfg(workspace, tmp_path / "plain2", *same, "save_final=false"))
    assert [ds[s] for s in range(1, 5)] == pytest.approx([h["loss"] for h in plain], abs=1e-4)
