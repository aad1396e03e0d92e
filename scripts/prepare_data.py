"""Generate the synthetic benchmark or check a downloaded dataset.

    python scripts/prepare_data.py dataset=synthetic
    python scripts/prepare_data.py dataset=refcocog paths.data_dir=/datasets
"""

import hydra
from omegaconf import DictConfig

from sam4mllm.data.prepare import prepare_data


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    prepare_data(cfg)


if __name__ == "__main__":
    main()
