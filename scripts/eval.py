"""Evaluate a trained SAM4MLLM on refCOCO/+/g, gRefCOCO, ReasonSeg, VQAv2 or the synthetic benchmark.

    python scripts/eval.py dataset=refcocog
    python scripts/eval.py --config-name table6          # paper Table 6 ablations as one multirun
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sam4mllm.evaluate import evaluate, threshold_sweep
from sam4mllm.report import markdown_table
from sam4mllm.training.launch import strip_local_rank


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    if metrics is not None:
        print(markdown_table(list(metrics), [list(metrics.values())]))
        print(f"written to {cfg.out_dir}")
        if cfg.eval.rethreshold:
            swept = threshold_sweep(cfg)
            print(markdown_table(list(swept[0]), [list(m.values()) for m in swept]))
            print(f"re-segmented into {Path(cfg.out_dir).parent}/thr<t>")


if __name__ == "__main__":
    sys.argv = strip_local_rank(sys.argv)
    main()
