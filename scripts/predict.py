"""Segment what one sentence, or each of several, refers to in one image with a trained SAM4MLLM.

    python scripts/predict.py image=photo.jpg "text='the dog on the left'"
    python scripts/predict.py image=photo.jpg "text=[the dog on the left,the cat]"
    python scripts/predict.py image=photo.jpg "text='all the dogs'" task=gres +exp=ppg
"""

import json

import hydra
from omegaconf import DictConfig

from sam4mllm.evaluate import predict_image


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    for record in predict_image(cfg):
        print(f"{record['sentence']!r} -> answer {record['text']!r}")
        print(json.dumps({k: record[k] for k in ("valid", "reason", "no_target", "boxes", "points", "labels")}))
        print(f"written to {record['folder']}: overlay.png, mask.png, result.json")


if __name__ == "__main__":
    main()
