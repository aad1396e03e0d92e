"""Generate PPG or PQPP training labels with a segmenter.

    python scripts/gen_labels.py +exp=ppg dataset=refcoco
    torchrun --nproc_per_node 4 scripts/gen_labels.py +exp=pqpp dataset=grefcoco
    deepspeed scripts/gen_labels.py +exp=ppg dataset=refcoco   # one shard per GPU, as training is launched
"""

import sys

import hydra
from omegaconf import DictConfig

from sam4mllm.labels import generate_labels, label_stats
from sam4mllm.training.launch import strip_local_rank


@hydra.main(version_base="1.3", config_path="../configs", config_name="gen_labels")
def main(cfg: DictConfig) -> None:
    merged = generate_labels(cfg)
    if merged is not None:
        print(f"{merged}: {label_stats(merged)}")


if __name__ == "__main__":
    sys.argv = strip_local_rank(sys.argv)
    main()
