"""Merge a trained LoRA adapter into its base model.

    python scripts/merge_lora.py outputs/runs/pqpp-qwen2vl/final outputs/merged/pqpp-qwen2vl [--base /path/base]
"""

import argparse

from sam4mllm.models.merge import merge_adapter

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dir", help="run_dir/final written by scripts/train.py")
    ap.add_argument("out_dir", help="where the merged model folder goes")
    ap.add_argument("--base", default=None, help="base model folder (default: the one used for training)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the model folder's own code (Qwen-VL-Chat needs it); only for a folder you trust")
    args = ap.parse_args()
    print(f"merged model saved to {merge_adapter(args.adapter_dir, args.out_dir, args.base, args.trust_remote_code)}")
