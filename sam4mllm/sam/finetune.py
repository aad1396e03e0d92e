"""Fine-tune SAM's mask decoder on COCO instances (paper §4.1).

Only the mask decoder trains; the image and prompt encoders stay frozen. Every image
that appears in a val/test split of refCOCO, refCOCO+, refCOCOg or gRefCOCO is removed
first, so the evaluation images never leak into training. Each instance is prompted
with its box; the loss is SAM's focal + dice (20:1) plus the IoU-head MSE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sam4mllm.atomic import write_atomic
from sam4mllm.config import build
from sam4mllm.data.base import load_image
from sam4mllm.data.errors import UNREADABLE, DatasetNotFoundError, MalformedSampleError, require
from sam4mllm.data.masks import coco_box, decode_segmentation
from sam4mllm.data.refer import LAYOUT as REFER_LAYOUT
from sam4mllm.data.unpickle import load_plain_pickle

log = logging.getLogger(__name__)
# The builders whose segmenters expose segment_anything's predictor and the mask decoder trained here.
DECODER_BUILDERS = ("sam4mllm.sam.sam_family.build_segment_anything", "sam4mllm.sam.sam_family.build_efficientvit_sam")
REFS_FILES = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p",
              "grefcoco": "grefs(unc).json"}


def evaluation_image_ids(refer_root: str | Path, datasets: list[str], require_all: bool = True) -> set[int]:
    """COCO image ids used by any non-train split of the given refer datasets."""
    ids: set[int] = set()
    for name in datasets:
        path = Path(refer_root) / name / REFS_FILES[name]
        if not path.exists():
            if require_all:
                raise DatasetNotFoundError(name, path, REFER_LAYOUT)
            log.warning("exclusion list: %s not found, its val/test images cannot be excluded", path)
            continue
        refs = json.loads(path.read_text()) if path.suffix == ".json" else load_plain_pickle(path)
        ids |= {int(r["image_id"]) for r in refs if r.get("split") != "train"}
    return ids


class CocoInstances(torch.utils.data.Dataset):
    """COCO images with their non-crowd instance masks and ``XYXY`` boxes, minus excluded images."""

    def __init__(self, instances: str | Path, image_dir: str | Path, exclude: set[int], min_area: int = 16,
                 max_instances: int = 16) -> None:
        require("coco", "<data_dir>/coco/annotations/instances_train2014.json + coco/train2014/*.jpg",
                Path(instances), Path(image_dir))
        data = json.loads(Path(instances).read_text())
        self.image_dir, self.max_instances = Path(image_dir), max_instances
        anns: dict[int, list[dict[str, Any]]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0) and a.get("area", min_area) >= min_area:
                anns.setdefault(int(a["image_id"]), []).append(a)
        self.images = [im for im in data["images"] if int(im["id"]) not in exclude and int(im["id"]) in anns]
        self.anns = anns
        self.excluded = sum(int(im["id"]) in exclude for im in data["images"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image HxWx3, masks NxHxW, boxes Nx4 XYXY)``; bad data raises ``CorruptImageError``,
        ``FileNotFoundError`` or ``MalformedSampleError``."""
        im = self.images[i]
        path = self.image_dir / im["file_name"]
        image = load_image(path, (im["height"], im["width"]) if "height" in im and "width" in im else None,
                           "the instances file says")
        h, w = image.shape[:2]
        anns = self.anns[int(im["id"])][: self.max_instances]
        try:
            masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns])
            boxes = np.array([coco_box(a) for a in anns], dtype=np.float64)
        except ValueError as err:
            raise MalformedSampleError(f"annotation of {path}: {err}") from err
        return image, masks, boxes


def sam_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """SAM's training loss: 20 x focal + dice on the mask, MSE of the predicted IoU."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** 2).flatten(1).mean(1)
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard = (logits > 0).float()
        i = (hard * target).flatten(1).sum(1)
        u = ((hard + target) > 0).float().flatten(1).sum(1)
        true_iou = i / u.clamp(min=1)
    return (20 * focal + dice + F.mse_loss(iou_pred.squeeze(1), true_iou, reduction="none")).mean()


def decoder_step(segmenter: Any, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """Loss of one image's instances, gradients flowing only into the mask decoder."""
    p, model = segmenter.predictor, segmenter.model
    p.set_image(image)
    features = p.features.clone()  # set_image runs in inference mode; a clone can enter autograd
    box = torch.as_tensor(p.transform.apply_boxes(boxes, p.original_size), dtype=torch.float, device=features.device)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    low, iou = model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    logits = model.postprocess_masks(low, p.input_size, p.original_size)[:, 0]
    return sam_loss(logits, torch.as_tensor(masks, dtype=torch.float, device=logits.device), iou)


def _settings(cfg: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the segmenter (its weight files by
    name, so that a moved file resumes; not its device or batch size) and the optimisation."""
    sam = {k: Path(v).name if k in ("checkpoint", "decoder_checkpoint", "path") and v else v
           for k, v in OmegaConf.to_container(cfg.sam, resolve=True).items() if k not in ("device", "batch_size")}
    return {"sam": sam, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "max_instances": cfg.max_instances,
            "seed": cfg.seed}


def finetune_decoder(cfg: Any, segmenter: Any = None) -> Path:
    """Train the mask decoder of ``cfg.sam`` on ``cfg.coco``; save ``mask_decoder.safetensors``.

    Returns the checkpoint path; ``train_log.json`` beside it holds the per-step losses and
    the images skipped as unreadable. Every ``save_every`` steps the decoder, optimizer,
    position and losses go to ``state.pt``, from which ``resume=true`` continues a killed
    run exactly where it stopped (the same weights as an uninterrupted run).
    """
    from safetensors.torch import save_file

    if segmenter is None and cfg.sam.get("_target_") not in DECODER_BUILDERS:  # before COCO's instances parse
        raise ValueError(f"sam={cfg.sam.get('_target_')} has no segment_anything mask decoder to fine-tune; "
                         "choose sam=sam_vit_h, sam_vit_l, sam_vit_b or efficientvit_sam")
    out_dir = Path(cfg.out_dir)
    ckpt, state_path = out_dir / "mask_decoder.safetensors", out_dir / "state.pt"
    if ckpt.exists() and not cfg.overwrite:
        raise FileExistsError(f"{ckpt} exists; set overwrite=true or choose another out_dir")
    if state_path.exists() and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{state_path} holds an unfinished run; set resume=true to continue it, "
                              "overwrite=true to start again, or choose another out_dir")
    exclude = evaluation_image_ids(cfg.exclude.refer_root, list(cfg.exclude.datasets), cfg.exclude.require_all)
    data = CocoInstances(cfg.coco.instances, cfg.coco.image_dir, exclude, max_instances=cfg.max_instances)
    log.info("fine-tuning on %d images (%d excluded as refer val/test images)", len(data), data.excluded)
    n, now = len(data), _settings(cfg)
    state: dict[str, Any] = {"step": 0, "images": n, "losses": [], "skipped": []}
    if cfg.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"resume=true but {state_path} does not exist")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["images"] != n:  # the order of every epoch would differ
            raise ValueError(f"{state_path} was trained on {state['images']} images, these settings give {n}; "
                             "resume with the same COCO files and exclusion lists, or overwrite=true")
        saved = json.loads(state.get("settings", "null"))
        if saved is None:
            log.warning("%s was saved by an older version: its segmenter and settings are not checked", state_path)
        elif saved != now:  # a decoder fitted to one SAM's features would go on training on another's
            changed = [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in sorted(saved.keys() | now.keys())
                       if saved.get(k) != now.get(k)]
            raise ValueError(f"{state_path} was trained with other settings ({'; '.join(changed)}); resume with "
                             "the saved ones, or overwrite=true")
    state["settings"] = json.dumps(now, sort_keys=True)
    segmenter = segmenter or build(cfg.sam)  # after the checks above: a refused out_dir, data or resume comes first
    if not hasattr(segmenter, "predictor"):
        raise ValueError(f"{segmenter.name} has no SAM mask decoder to fine-tune; choose a SAM-family sam/ config")

    torch.manual_seed(cfg.seed)
    model = segmenter.model
    model.requires_grad_(False)
    model.mask_decoder.requires_grad_(True)
    model.mask_decoder.train()
    opt = torch.optim.AdamW(model.mask_decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.resume:
        model.mask_decoder.load_state_dict(state.pop("decoder"))
        opt.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("torch_rng"))
        log.info("resuming %s at step %d", state_path, state["step"])
    bar = tqdm(total=cfg.epochs * n, initial=state["step"], desc="decoder fine-tuning", disable=not cfg.progress)
    start = state["step"]
    for step in range(start, cfg.epochs * n):
        epoch, pos = divmod(step, n)
        if pos == 0 or step == start:  # each epoch's order depends on the seed and the epoch alone
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        try:
            sample = data[int(order[pos])]
        except UNREADABLE as err:
            if not state["skipped"]:
                log.warning("%s; such images are skipped and counted in train_log.json", err)
            if (why := f"{type(err).__name__}: {err}") not in state["skipped"]:  # once, not once per epoch
                state["skipped"].append(why)
        else:
            loss = decoder_step(segmenter, *sample)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["losses"].append(float(loss.detach()))
        state["step"] = step + 1
        bar.update(1)
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.epochs * n:
            _save_state(state_path, state, model.mask_decoder, opt)
    bar.close()
    model.mask_decoder.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder = {k: v.detach().contiguous().cpu() for k, v in model.mask_decoder.state_dict().items()}
    write_atomic(ckpt, lambda tmp: save_file(decoder, str(tmp)))
    (out_dir / "train_log.json").write_text(json.dumps({"losses": state["losses"], "images": n,
                                                        "excluded_images": data.excluded,
                                                        "skipped": state["skipped"]}))
    state_path.unlink(missing_ok=True)  # finished: the decoder file is the result
    return ckpt


def _save_state(path: Path, state: dict[str, Any], decoder: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Write the run's state atomically (a kill mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {**state, "decoder": decoder.state_dict(), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    write_atomic(path, lambda tmp: torch.save(full, tmp))
