"""The PQPP label job: each image decoded once, passed on to its other sentences, vs once per sentence.

    python bench/label_job.py [--images 60] [--size 640 480]

PQPP labels need no segmenter, so decoding images is most of the job. Runs the real job
(``generate_labels``, one process) on the synthetic train split at COCO-like size, then
again with every sentence decoding its own image (the loader's ``image`` argument dropped),
and checks both write the same labels. Best of two runs each.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.labels import generate_labels, label_stats


def _run(data_dir: Path, out: Path) -> tuple[float, bytes]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="gen_labels", overrides=[
            "+exp=pqpp", f"paths.data_dir={data_dir}", f"out_dir={out}", "progress=false", "overlays=0"])
    t0 = time.perf_counter()
    merged = generate_labels(cfg)
    return time.perf_counter() - t0, merged.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    args = ap.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synthetic(tmp / "synthetic", SyntheticConfig(
            width=args.size[0], height=args.size[1], images={"train": args.images, "val": 1, "testA": 1, "testB": 1}))
        once = min(_run(tmp, tmp / f"once{i}") for i in range(2))
        plain_load = ReferDataset.load
        ReferDataset.load = lambda self, record, image=None: plain_load(self, record)  # the old path
        try:
            each = min(_run(tmp, tmp / f"each{i}") for i in range(2))
        finally:
            ReferDataset.load = plain_load
        stats = label_stats(tmp / "once0" / "labels.jsonl")
    n, img = stats["samples"], stats["images"]
    print(f"PQPP label job, synthetic train split: {img} images of {args.size[0]}x{args.size[1]} (PNG), {n} sentences "
          f"({n / img:.1f} per image)")
    print("| path | job (s) | sentences/s |")
    print("|------|---------|-------------|")
    print(f"| each image decoded once | {once[0]:.2f} | {n / once[0]:.0f} |")
    print(f"| each sentence decodes its image | {each[0]:.2f} | {n / each[0]:.0f} |")
    print(f"speed-up: {each[0] / once[0]:.1f}x   same labels: {once[1] == each[1]}")


if __name__ == "__main__":
    main()
