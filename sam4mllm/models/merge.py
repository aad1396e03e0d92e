"""Merge a trained LoRA adapter into its base model and save a plain model folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

UNTRAINED_HINT = "; or set checkpoint=null to evaluate the untrained backbone"


def run_info(final_dir: str | Path, family: str | None = None, hint: str = "") -> dict:
    """``sam4mllm.json`` of a ``run_dir/final`` written by ``scripts/train.py`` (family, base,
    finetune), checked to be a run of ``family`` when it is given; ``hint`` ends a missing one's error."""
    path = Path(final_dir) / "sam4mllm.json"
    if not path.exists():
        raise FileNotFoundError(f"no trained checkpoint at {final_dir} (expected sam4mllm.json from "
                                f"scripts/train.py, in run_dir/final): train first{hint}")
    info = json.loads(path.read_text())
    if family is not None and info["family"] != family:
        raise ValueError(f"{final_dir} was trained on {info['family']}, not {family}: choose the model config it "
                         f"was trained with (model=..., its backbone was {info.get('base')})")
    return info


def merge_adapter(final_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
                  trust_remote_code: bool = False) -> Path:
    """Load ``base`` (default: the base recorded at training) + the adapter in ``final_dir``; merge and save.

    A family that exists only as remote code (Qwen-VL-Chat) needs ``trust_remote_code``.
    """
    from peft import PeftModel

    from sam4mllm.models.adapter import FAMILIES, auto_classes

    final_dir, out_dir = Path(final_dir), Path(out_dir)
    info = run_info(final_dir)
    if info["finetune"] != "lora":
        raise ValueError(f"{final_dir} holds a full fine-tune ({info['finetune']}); there is nothing to merge")
    base = Path(base or info["base"])
    if not (base / "config.json").exists():  # the path recorded at training may be another machine's
        raise FileNotFoundError(f"no base model folder at {base} (the backbone {final_dir} was trained from); "
                                "pass its folder on this machine: --base <folder>")
    if FAMILIES[info["family"]].trust_remote_code and not trust_remote_code:
        raise ValueError(f"{info['family']} runs remote code from {base}; merge with --trust-remote-code, "
                         "only for a folder you trust")
    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    model_cls, processor_cls = auto_classes(info["family"])
    model = model_cls.from_pretrained(base, **kw)
    merged = PeftModel.from_pretrained(model, final_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    processor_cls.from_pretrained(final_dir, **kw).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _pixels(size: Any) -> dict[str, int]:
    return {k: v for k, v in dataclasses.asdict(size).items() if v is not None}


def check_image_size(checkpoint: str | Path, processor: Any) -> None:
    """Refuse a processor that resizes images otherwise than the one saved with the run in ``checkpoint``:
    the model would see inputs (and coordinates) it never saw. A family with no image processor passes."""
    here = getattr(processor, "image_processor", None)
    if here is None:
        return
    from transformers import AutoImageProcessor

    trained = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=True).size
    if trained != here.size:
        raise ValueError(f"{checkpoint} was trained on images resized to {_pixels(trained)}, but this model "
                         f"resizes to {_pixels(here.size)}; set model.max_pixels as in training")


def load_finetuned(adapter: object, checkpoint: str | Path) -> None:
    """Put the weights trained by ``scripts/train.py`` (``run_dir/final``) into ``adapter.model``."""
    from peft import PeftModel

    checkpoint = Path(checkpoint)
    info = run_info(checkpoint, adapter.family, UNTRAINED_HINT)  # type: ignore[attr-defined]
    check_image_size(checkpoint, adapter.processor)  # type: ignore[attr-defined]
    if info["finetune"] == "lora":
        adapter.model = PeftModel.from_pretrained(adapter.model, checkpoint).merge_and_unload()  # type: ignore[attr-defined]
    else:  # the class the backbone was loaded with (a remote-code class too, already trusted by the adapter)
        model = adapter.model  # type: ignore[attr-defined]
        adapter.model = type(model).from_pretrained(checkpoint, local_files_only=True, dtype=model.dtype)  # type: ignore[attr-defined]
    adapter.model.eval()  # type: ignore[attr-defined]
