"""Fine-tune SAM's mask decoder on COCO (refer val/test images excluded).

    python scripts/finetune_sam_decoder.py sam.checkpoint=checkpoints/efficientvit_sam_xl1.pt
    python scripts/finetune_sam_decoder.py sam.checkpoint=... resume=true   # continue a killed run
    # then evaluate with: sam.decoder_checkpoint=outputs/sam_decoder/mask_decoder.safetensors
"""

import hydra
from omegaconf import DictConfig

from sam4mllm.sam.finetune import finetune_decoder


@hydra.main(version_base="1.3", config_path="../configs", config_name="finetune_sam_decoder")
def main(cfg: DictConfig) -> None:
    print(f"saved {finetune_decoder(cfg)}")


if __name__ == "__main__":
    main()
