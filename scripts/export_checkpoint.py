"""Write a training checkpoint as a folder that scripts/eval.py loads, laid out as run_dir/final.

    python scripts/export_checkpoint.py outputs/runs/pqpp-qwen2vl                # the latest checkpoint
    python scripts/export_checkpoint.py outputs/runs/pqpp-qwen2vl --tag step-0001000
    python scripts/eval.py checkpoint=outputs/runs/pqpp-qwen2vl/exported/step-0001000
"""

import argparse

from sam4mllm.training.trainer import export_checkpoint

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run_dir of scripts/train.py (holding checkpoints/)")
    ap.add_argument("--tag", default=None, help="step-NNNNNNN (default: the latest checkpoint)")
    ap.add_argument("--out", default=None, help="the folder to write (default: run_dir/exported/<tag>)")
    args = ap.parse_args()
    out = export_checkpoint(args.run_dir, args.tag, args.out)
    print(f"checkpoint exported to {out}; score it with: python scripts/eval.py checkpoint={out} (and the run's "
          "model=... and dataset overrides)")
