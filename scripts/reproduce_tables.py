"""Collect evaluation outputs into the layouts of paper Tables 2-6 (ours / paper).

    python scripts/reproduce_tables.py [outputs/eval] [--out tables.md]
"""

import argparse
from pathlib import Path

from sam4mllm.tables import render_tables

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_root", nargs="?", default="outputs/eval")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()
    text = render_tables(args.eval_root)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
