"""Merge a trained LoRA adapter into its base model and save a plain model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def merge_adapter(final_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Load ``base`` (default: the base recorded at training) + the adapter in ``final_dir``; merge and save."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    final_dir, out_dir = Path(final_dir), Path(out_dir)
    info = json.loads((final_dir / "sam4mllm.json").read_text())
    if info["finetune"] != "lora":
        raise ValueError(f"{final_dir} holds a full fine-tune ({info['finetune']}); there is nothing to merge")
    base = Path(base or info["base"])
    model = AutoModelForImageTextToText.from_pretrained(base, local_files_only=True)
    merged = PeftModel.from_pretrained(model, final_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoProcessor.from_pretrained(final_dir, local_files_only=True).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_finetuned(adapter: object, checkpoint: str | Path) -> None:
    """Put the weights trained by ``scripts/train.py`` (``run_dir/final``) into ``adapter.model``."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    checkpoint = Path(checkpoint)
    info_path = checkpoint / "sam4mllm.json"
    if not info_path.exists():
        raise FileNotFoundError(
            f"no trained checkpoint at {checkpoint} (expected sam4mllm.json from scripts/train.py); train first, "
            "or set checkpoint=null to evaluate the untrained backbone"
        )
    info = json.loads(info_path.read_text())
    if info["family"] != adapter.family:  # type: ignore[attr-defined]
        raise ValueError(f"{checkpoint} was trained on {info['family']}, not {adapter.family}")  # type: ignore[attr-defined]
    if info["finetune"] == "lora":
        adapter.model = PeftModel.from_pretrained(adapter.model, checkpoint).merge_and_unload()  # type: ignore[attr-defined]
    else:
        dtype = adapter.model.dtype  # type: ignore[attr-defined]
        adapter.model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True, dtype=dtype)  # type: ignore[attr-defined]
    adapter.model.eval()  # type: ignore[attr-defined]
