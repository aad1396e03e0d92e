"""The embedded default end to end on the CPU (what `make demo` runs).

    python scripts/demo.py
"""

import hydra
from omegaconf import DictConfig

from sam4mllm.demo import run_demo


@hydra.main(version_base="1.3", config_path="../configs", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
