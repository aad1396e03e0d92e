"""Fine-tune an MLLM to write SAM prompts (LoRA under DeepSpeed ZeRO-2 by default).

    deepspeed scripts/train.py +exp=pqpp
    python scripts/train.py +exp=ppg deepspeed=none
"""

import sys

import hydra
from omegaconf import DictConfig

from sam4mllm.training.launch import strip_local_rank
from sam4mllm.training.trainer import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv = strip_local_rank(sys.argv)
    main()
