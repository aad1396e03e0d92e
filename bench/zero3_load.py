"""What each of 2 DeepSpeed CPU ranks holds after loading the backbone, whole (ZeRO-2) or into shards (ZeRO-3).

    python bench/zero3_load.py

Builds a random-init Qwen2-VL of ~126 M parameters (fp32; the tiny recipe at a larger size),
loads it through the trainer's path (``Trainer._zero3_loading``) on 2 ranks launched by
``deepspeed``, once per stage, and prints the weights each rank holds and its peak RSS.

Under ZeRO-3, transformers runs ``deepspeed.zero.Init`` and each rank keeps only its shards
(on GPUs: on its card; loaded whole, every card first receives the whole model, which
DeepSpeed then shards). Host memory goes the other way on a CPU: a model loaded whole stays
views of the memory-mapped file, shared by the ranks, while zero.Init copies each shard into
memory of its own, and its loading peaks higher.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"vocab_size": 1200, "hidden_size": 1024, "intermediate_size": 4096, "num_layers": 8, "num_heads": 16,
         "num_kv_heads": 4, "vision_depth": 2, "vision_embed": 256, "vision_heads": 4, "image_pixels": 12544,
         "seed": 0}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_main(out: str, stage: str) -> None:
    """One rank: compose the train config at ``stage``, load the model as the trainer does, print RSS."""
    import torch
    from hydra import compose, initialize_config_dir

    from sam4mllm import CONFIG_DIR
    from sam4mllm.config import build
    from sam4mllm.training.distributed import init_distributed
    from sam4mllm.training.trainer import Trainer

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "+exp=pqpp", f"paths.output_dir={out}", f"deepspeed={stage}", "model=tiny_qwen2vl",
            f"model.path={out}/model", f"run_dir={out}/run-{stage}",
            *(f"model.tiny.{k}={v}" for k, v in SIZES.items())])
    init_distributed(True, torch.device("cpu"))
    trainer = Trainer(cfg)
    before = _peak_mb()
    with trainer._zero3_loading():
        trainer.adapter = build(cfg.model)
    params = list(trainer.adapter.model.parameters())
    whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params) / 2**20
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in params) / 2**20
    print(f"| {stage} | {torch.distributed.get_rank()} | {whole:,.0f} | {held:,.0f} | {before:,.0f} | "
          f"{_peak_mb():,.0f} |", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    from sam4mllm.models.tiny import TinySpec, build_tiny
    from sam4mllm.training.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        build_tiny(TinySpec(family="qwen2vl", **SIZES), Path(out) / "model")  # once, outside the ranks
        print("| stage | rank | model (MB) | this rank's weights (MB) | peak RSS before loading (MB) | after (MB) |")
        print("|---|---|---|---|---|---|")
        for stage in ("zero2", "zero3"):
            launcher = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()),
                        "--num_gpus", "2", __file__, "--rank-main", out, stage]
            r = subprocess.run(launcher, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
            rows = sorted(line for line in r.stdout.splitlines() if line.startswith(f"| {stage} |"))
            if r.returncode != 0 or len(rows) != 2:
                raise SystemExit(f"{stage} failed:\n{(r.stdout + r.stderr)[-3000:]}")
            print("\n".join(rows))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher appends it
    if args[:1] == ["--rank-main"]:
        rank_main(*args[1:3])
    else:
        main()
