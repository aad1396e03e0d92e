"""Training-step throughput.

    python bench/train_step.py            # tiny Qwen2-VL on the CPU (LoRA r=256 and full fine-tune)
    python bench/train_step.py --gpu      # + one LoRA r=256 step of a random-init 7B Qwen2-VL (CUDA only)

CPU: tokens/s and s/step of optimizer steps of the tiny model on PQPP dialogs of the
synthetic benchmark (plain PyTorch, one process), the points round as one dialog and as
branches (``pqpp_mode=branch``: the same examples in fewer tokens), and with 3 sentences
of one image packed into each dialog (``sentences_per_dialog=3``, as the official code
packs up to 5: each image encoded once for them); sentences/s counts a VQA question as
one sentence and is the mixture's mean sentences per dialog over s/step. GPU: batch 2 x length 2048, ZeRO-2, bf16, peak
memory; random weights, since no checkpoint can be downloaded here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def cpu_tiny(steps: int = 8) -> None:
    from hydra import compose, initialize_config_dir

    from sam4mllm import CONFIG_DIR
    from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
    from sam4mllm.labels import generate_labels
    from sam4mllm.training.data import build_mixture
    from sam4mllm.training.trainer import train

    os.environ["WANDB_MODE"] = "disabled"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        generate_synthetic(d / "data/synthetic", SyntheticConfig(images={"train": 40}, reason_images={}))
        base = [f"paths.data_dir={d / 'data'}", f"paths.output_dir={d / 'out'}"]
        print("| tiny Qwen2-VL, CPU | PQPP points round | sentences per dialog | micro-batch x accum | steps | "
              "tokens/s | s/step | sentences/s | peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for ds in ("synthetic", "synthetic_gres"):
                generate_labels(compose(config_name="gen_labels", overrides=[
                    *base, "+exp=pqpp", f"dataset={ds}", "progress=false"]))
            # the same examples (10 points per box) every row: branches train them in fewer tokens
            for mode, points, packed in (("lora", "per_point", 1), ("lora", "per_point", 3), ("full", "per_point", 1),
                                         ("full", "branch", 1)):
                cfg = compose(config_name="train", overrides=[
                    *base, "+exp=pqpp", "deepspeed=none", f"run_dir={d / mode / points / str(packed)}",
                    "progress=false", "save_final=false", f"train.finetune={mode}", f"pqpp_mode={points}",
                    f"sentences_per_dialog={packed}", "train.micro_batch_size=4", "train.grad_accum=2",
                    f"train.max_steps={steps}", "train.save_every=0"])
                hist = train(cfg)[1:]  # the first step includes warm-up work
                tok_s = sum(h["tokens_per_s"] for h in hist) / len(hist)
                step_s = sum(h["step_s"] for h in hist) / len(hist)
                mix = build_mixture(cfg.data.sources, None, "pqpp", points, sentences_per_dialog=packed)
                dialogs = cfg.train.micro_batch_size * cfg.train.grad_accum  # per optimizer step
                per_dialog = sum(1 + len(mix.sources[n][0][j].more) for n, j in mix.items) / len(mix)
                print(f"| {mode} | {points} | {per_dialog:.2f} | 4 x 2 | {len(hist)} | {tok_s:,.0f} | {step_s:.3f} | "
                      f"{dialogs * per_dialog / step_s:,.1f} | {hist[-1]['peak_mem_mb']:,.0f} |")


def gpu_7b_lora_step(seq_len: int = 2048, batch: int = 2) -> dict[str, float]:
    """One ZeRO-2 LoRA r=256 step of a random-init Qwen2-VL-7B (text tokens only); CUDA required."""
    import deepspeed
    from lion_pytorch import Lion
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from sam4mllm.models.adapter import FAMILIES

    if not torch.cuda.is_available():
        raise RuntimeError("the 7B step needs a CUDA device")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed("nccl")
    cfg = Qwen2VLConfig()  # the library's defaults are Qwen2-VL-7B's sizes
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    spec = FAMILIES["qwen2vl"]
    model = get_peft_model(model, LoraConfig(r=256, lora_alpha=128, lora_dropout=0.05, target_modules=spec.lora_regex,
                                             modules_to_save=list(spec.trainable)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    opt = Lion([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
    ds = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    ids = torch.randint(0, cfg.text_config.vocab_size, (batch, seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first step warms up kernels; time the second
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"tokens_per_s": batch * seq_len / dt, "step_s": dt, "peak_mem_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="also run the 7B LoRA step (CUDA)")
    args = ap.parse_args()
    cpu_tiny()
    if args.gpu:
        r = gpu_7b_lora_step()
        print(f"\nQwen2-VL-7B (random init), LoRA r=256, ZeRO-2, bf16, batch 2 x 2048: "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['step_s']:.2f} s/step, peak {r['peak_mem_gb']:.1f} GiB")
    else:
        print("\n(7B GPU step skipped: run with --gpu on a CUDA machine, or pytest -m gpu)")


if __name__ == "__main__":
    main()
