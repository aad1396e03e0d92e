"""SAM-family backends: segment_anything (ViT-H/L/B), EfficientViT-SAM (``efficientsam``), transformers SamModel.

Checkpoints load with ``torch.load(weights_only=True)`` (or safetensors) and strict key
checks. Random weights are used only when ``allow_random_init=True`` (tests, benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam4mllm.device import resolve_device
from sam4mllm.sam.base import CheckpointNotFoundError, Prediction, Prompts, Segmenter, select_masks

SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_SOURCE = "the segment-anything model zoo (github.com/facebookresearch/segment-anything#model-checkpoints)"
EFFICIENTVIT_VARIANTS = ("l0", "l1", "l2", "xl0", "xl1")
EFFICIENTVIT_SOURCE = "the EfficientViT-SAM release (huggingface.co/mit-han-lab/efficientvit-sam)"


def _checkpoint(path: str | Path | None, allow_random_init: bool, backend: str, official: str, source: str
                ) -> Path | None:
    """The checkpoint path to load, ``None`` for deliberate random init, or a clear error."""
    if path is not None and Path(path).exists():
        return Path(path)
    if path is None and allow_random_init:
        return None
    raise CheckpointNotFoundError(backend, path, official, source)


def load_weights(module: torch.nn.Module, path: Path, unwrap: str | None = None) -> None:
    """Load a checkpoint safely (safetensors, or ``torch.load(weights_only=True)``) with strict keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if unwrap and isinstance(state, dict) and unwrap in state:
        state = state[unwrap]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path} does not match the model: missing {missing[:5]}..., unexpected {unexpected[:5]}...")


class PredictorSegmenter(Segmenter):
    """Wraps an upstream SAM-style predictor (``set_image`` + ``predict_torch``).

    Prompts are transformed exactly as the upstream ``predict`` does (numpy, then
    float tensors), so each mask equals the one the upstream predictor returns for
    that prompt alone.
    """

    def __init__(self, predictor: Any, name: str, multimask: bool = True, select: str = "best",
                 batch_size: int = 64) -> None:
        super().__init__()
        self.predictor, self.name = predictor, name
        self.multimask, self.select, self.batch_size = multimask, select, batch_size

    @property
    def model(self) -> torch.nn.Module:
        """The underlying SAM model."""
        return self.predictor.model

    def _embed(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    @torch.inference_mode()
    def _predict(self, prompts: Prompts) -> Prediction:
        p, orig = self.predictor, self.predictor.original_size
        device = p.device
        out_m, out_s = [], []
        for start in range(0, len(prompts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            box = coords = labels = None
            if prompts.boxes is not None:
                box = torch.as_tensor(p.transform.apply_boxes(prompts.boxes[sl], orig), dtype=torch.float,
                                      device=device)
            if prompts.points is not None:
                coords = torch.as_tensor(p.transform.apply_coords(prompts.points[sl], orig), dtype=torch.float,
                                         device=device)
                labels = torch.as_tensor(prompts.labels[sl], dtype=torch.int, device=device)
            masks, scores, _ = p.predict_torch(coords, labels, box, multimask_output=self.multimask)
            sel = select_masks(masks.cpu().numpy(), scores.float().cpu().numpy(), self.select)
            out_m.append(sel.masks)
            out_s.append(sel.scores)
        return Prediction(np.concatenate(out_m), np.concatenate(out_s))


def build_segment_anything(
    model_type: str = "vit_h",
    checkpoint: str | None = None,
    allow_random_init: bool = False,
    decoder_checkpoint: str | None = None,
    encoder: dict[str, Any] | None = None,
    device: str = "auto",
    multimask: bool = True,
    select: str = "best",
    batch_size: int = 64,
) -> PredictorSegmenter:
    """segment_anything SAM (``vit_h``/``vit_l``/``vit_b``) from a checkpoint path.

    ``encoder`` (``embed_dim, depth, num_heads, global_attn_indexes``) builds a custom,
    randomly initialised image encoder (for CPU tests); it requires ``allow_random_init``.
    """
    from segment_anything import SamPredictor, sam_model_registry
    from segment_anything.build_sam import _build_sam

    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown SAM model_type {model_type!r}; choose one of {sorted(SAM_CHECKPOINTS)}")
    path = _checkpoint(checkpoint, allow_random_init or encoder is not None, f"segment_anything {model_type}",
                       SAM_CHECKPOINTS[model_type], SAM_SOURCE)
    if encoder is not None:
        if path is not None or not allow_random_init:
            raise ValueError("a custom encoder is random-init only: set checkpoint=null and allow_random_init=true")
        model = _build_sam(
            encoder_embed_dim=encoder["embed_dim"], encoder_depth=encoder["depth"],
            encoder_num_heads=encoder["num_heads"], encoder_global_attn_indexes=list(encoder["global_attn_indexes"]),
        )
    else:
        model = sam_model_registry[model_type](checkpoint=None)  # weights load below, safely
        if path is not None:
            load_weights(model, path)
    if decoder_checkpoint:
        load_weights(model.mask_decoder, Path(decoder_checkpoint))
    model.to(resolve_device(device)).eval()
    return PredictorSegmenter(SamPredictor(model), f"segment_anything-{model_type}", multimask, select, batch_size)


def build_efficientvit_sam(
    variant: str = "xl1",
    checkpoint: str | None = None,
    allow_random_init: bool = False,
    decoder_checkpoint: str | None = None,
    device: str = "auto",
    multimask: bool = True,
    select: str = "best",
    batch_size: int = 64,
) -> PredictorSegmenter:
    """EfficientViT-SAM ``l0``..``xl1`` (the paper uses ``xl1``) through the ``efficientsam`` package."""
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    if variant not in EFFICIENTVIT_VARIANTS:
        raise ValueError(f"unknown EfficientViT-SAM variant {variant!r}; choose one of {EFFICIENTVIT_VARIANTS}")
    official = f"efficientvit_sam_{variant}.pt"
    path = _checkpoint(checkpoint, allow_random_init, f"EfficientViT-SAM {variant}", official, EFFICIENTVIT_SOURCE)
    model = create_efficientvit_sam_model(f"efficientvit-sam-{variant}", pretrained=False)
    if path is not None:
        load_weights(model, path, unwrap="state_dict")
    if decoder_checkpoint:
        load_weights(model.mask_decoder, Path(decoder_checkpoint))
    model.to(resolve_device(device)).eval()
    return PredictorSegmenter(EfficientViTSamPredictor(model), f"efficientvit_sam-{variant}", multimask, select,
                              batch_size)


class HFSamSegmenter(Segmenter):
    """transformers ``SamModel`` + ``SamProcessor`` from a local folder (``save_pretrained`` layout)."""

    def __init__(self, model: Any, processor: Any, multimask: bool = True, select: str = "best",
                 batch_size: int = 64, name: str = "hf_sam") -> None:
        super().__init__()
        self.model, self.processor, self.name = model.eval(), processor, name
        self.multimask, self.select, self.batch_size = multimask, select, batch_size
        self._image: np.ndarray | None = None
        self._emb: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path: str | None, device: str = "auto", **kwargs: Any) -> HFSamSegmenter:
        """Load model and processor from a local folder; no hub access."""
        from transformers import SamModel, SamProcessor

        if path is None or not (Path(path) / "config.json").exists():
            raise CheckpointNotFoundError("transformers SamModel", path, "facebook/sam-vit-huge (a local folder)",
                                          "the Hugging Face hub, saved with save_pretrained")
        model = SamModel.from_pretrained(path, local_files_only=True).to(resolve_device(device))
        return cls(model, SamProcessor.from_pretrained(path, local_files_only=True), **kwargs)

    @torch.inference_mode()
    def _embed(self, image: np.ndarray) -> None:
        inputs = self.processor(images=image, return_tensors="pt")
        self._image = image
        self._emb = self.model.get_image_embeddings(inputs["pixel_values"].to(self.model.device))

    @torch.inference_mode()
    def _predict(self, prompts: Prompts) -> Prediction:
        out_m, out_s = [], []
        for start in range(0, len(prompts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            kw: dict[str, Any] = {}
            if prompts.boxes is not None:
                kw["input_boxes"] = [prompts.boxes[sl].tolist()]
            if prompts.points is not None:
                kw["input_points"] = [prompts.points[sl].tolist()]
                kw["input_labels"] = [prompts.labels[sl].tolist()]
            inputs = self.processor(images=self._image, return_tensors="pt", **kw)
            feed = {k: inputs[k].to(self.model.device) for k in ("input_boxes", "input_points", "input_labels")
                    if k in inputs}
            out = self.model(image_embeddings=self._emb, multimask_output=self.multimask, **feed)
            masks = self.processor.image_processor.post_process_masks(
                out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
            sel = select_masks(masks.numpy(), out.iou_scores[0].float().cpu().numpy(), self.select)
            out_m.append(sel.masks)
            out_s.append(sel.scores)
        return Prediction(np.concatenate(out_m), np.concatenate(out_s))
