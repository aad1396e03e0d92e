"""``evaluate(cfg)``: run a :class:`Sam4MLLM` over a split and score it with the official metrics.

Per-sample predictions (RLE masks, boxes, points, raw text, validity, timings) are
written incrementally to JSONL shards, resume after a kill, shard across processes
(``RANK``/``WORLD_SIZE`` or ``shard.*``) and merge into one ``predictions.jsonl`` that does
not depend on the shard count. Metrics are always computed from that file
(:func:`rescore`), so a rescore gives exactly what the run reported. An unparseable
answer is scored as an empty mask (IoU 0 for a target; on gRefCOCO not a "no target"
prediction either, see :func:`said_no_target`) and counted in ``invalid_rate``. A sample
whose image cannot be read, or does not match its annotations, keeps its line in the
predictions with the error, is left out of the metrics and is counted in ``unreadable``
(a resume retries it); annotation entries the loader skipped are counted in ``skipped``
(both with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image
from tqdm.auto import tqdm

from sam4mllm import trained_variant
from sam4mllm.config import build
from sam4mllm.data import build_dataset
from sam4mllm.data.base import load_image
from sam4mllm.data.masks import decode_segmentation, encode_rle
from sam4mllm.device import config_on_device
from sam4mllm.inference import PQPPConfig, Sam4MLLM, SegmentResult, segment_targets
from sam4mllm.metrics import SegmentationMeter, VQAMeter, said_no_target, score_sample
from sam4mllm.report import markdown_table
from sam4mllm.shards import (
    ShardWriter,
    assign,
    iter_records,
    merge_shards,
    read_shard,
    shard_from_env,
    shard_path,
    write_records,
)
from sam4mllm.viz import display_scale, overlay, save_png, side_by_side, spread

log = logging.getLogger(__name__)
PRED_FORMAT, PRED_VERSION, MERGED = "sam4mllm-predictions", 1, "predictions.jsonl"


def build_predictor(cfg: Any) -> Any:
    """The :class:`Sam4MLLM` of a config: backbone + trained weights + segmenter + round-2 settings."""
    from sam4mllm.models import FAMILIES
    from sam4mllm.models.merge import UNTRAINED_HINT, check_image_size, load_finetuned, run_info

    # The trained checkpoint, the segmenter and the image size before the backbone's weights: a
    # missing run or SAM checkpoint, or another model.max_pixels, fails in seconds, not after a 7B has loaded.
    info = run_info(cfg.checkpoint, cfg.model.family, UNTRAINED_HINT) if cfg.checkpoint else {}
    if info:
        _check_trained_for(info, cfg)
    segmenter = build(cfg.sam)
    model_cfg, weights = cfg.model, cfg.checkpoint
    if info.get("finetune") == "full" and not FAMILIES[cfg.model.family].trust_remote_code:
        # The run's folder holds the whole trained model and its processor: loaded from there alone, not
        # after the base (which would peak at two models' memory). Remote code stays the base folder's.
        model_cfg, weights = OmegaConf.merge(cfg.model, {"path": str(cfg.checkpoint)}), None
        with open_dict(model_cfg):
            model_cfg.pop("tiny", None)
    adapter = build(model_cfg, check_processor=(lambda p: check_image_size(cfg.checkpoint, p)) if cfg.checkpoint
                    else None)
    if weights:
        load_finetuned(adapter, weights)
    return Sam4MLLM(adapter, segmenter, cfg.variant, pqpp_config(cfg), cfg.eval.max_new_tokens, cfg.seed)


def _check_trained_for(info: dict[str, Any], cfg: Any) -> None:
    """Refuse a run trained on the other variant's dialogs (its answers would be scored as this
    one's); warn when a PQPP run's points round was trained in the other layout than it is asked."""
    trained = info.get("variant")  # not recorded by older runs: nothing to check
    if trained and trained != trained_variant(cfg.variant):
        raise ValueError(f"{cfg.checkpoint} was trained as {trained}, but variant={cfg.variant} asks it the "
                         f"{trained_variant(cfg.variant)} dialog: set variant={trained}"
                         + (" (or box_only)" if trained == "pqpp" else ""))
    mode = info.get("pqpp_mode")
    if cfg.variant == "pqpp" and mode and (mode == "joint") != (cfg.eval.pqpp.mode == "joint"):
        log.warning("%s was trained with pqpp_mode=%s but is asked with eval.pqpp.mode=%s (eval=official asks "
                    "joint, the default per point)", cfg.checkpoint, mode, cfg.eval.pqpp.mode)


def pqpp_config(cfg: Any) -> PQPPConfig:
    """An evaluation config's round-2 settings (``cfg.eval.pqpp``)."""
    return PQPPConfig(**OmegaConf.to_container(cfg.eval.pqpp, resolve=True))


def _thresholds(pqpp: PQPPConfig) -> dict[str, float]:
    return {"pqpp_threshold": float(pqpp.threshold), "pqpp_yes_threshold": float(pqpp.yes_bar)}


def _checkpoint_stamp(checkpoint: str | None) -> list[tuple[str, int, int]]:
    """``(name, size, mtime)`` of the checkpoint's files: a model retrained into the same folder
    must not inherit the old model's predictions when an evaluation resumes."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return []
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in sorted(Path(checkpoint).iterdir())
            if p.is_file()]


# eval settings that do not change a record: a resume may change them (a smaller batch after
# running out of GPU memory, more overlays, another sweep). A batch answers as one sentence at a
# time up to float rounding (README, "Quick start").
NOT_PREDICTING = ("name", "batch_size", "overlays", "rethreshold")


def _header(cfg: Any, split: str, data: str) -> dict[str, Any]:
    predicting = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k not in NOT_PREDICTING}
    semantic = {"variant": cfg.variant, "checkpoint": str(cfg.checkpoint),
                "checkpoint_files": _checkpoint_stamp(cfg.checkpoint), "data": data, "dataset": cfg.dataset.name,
                "split": split, "model": config_on_device(cfg.model), "sam": config_on_device(cfg.sam),
                "eval": predicting, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # PQPP records keep only the answers above the thresholds: rethreshold() must know them.
    threshold = _thresholds(pqpp_config(cfg)) if cfg.variant == "pqpp" else {}
    return {"format": PRED_FORMAT, "version": PRED_VERSION, "config_hash": digest, "variant": cfg.variant,
            "dataset": cfg.dataset.name, "split": split, "task": cfg.dataset.task, **threshold}


def _record(r: SegmentResult) -> dict[str, Any]:
    """A segmentation result as a JSON-able prediction record (masks as RLE)."""
    return {"text": r.text, "valid": r.valid, "reason": r.reason, "no_target": r.no_target, "truncated": r.truncated,
            "masks": [encode_rle(m) for m in r.masks], "boxes": np.asarray(r.boxes).tolist(),
            "points": [p.tolist() for p in r.points], "labels": [lb.tolist() for lb in r.labels],
            "confidences": [c.tolist() for c in r.confidences], "timings": r.timings}


def predict_samples(predictor: Any, samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Prediction records (JSON-able) of samples of one dataset, their round 1 generated as one batch."""
    if samples and samples[0].task == "vqa":
        answers = predictor.generate_many([_vqa_question(s.expression) for s in samples], [s.image for s in samples])
        return [{"answer": text.strip(), "valid": True, "truncated": prefix.truncated} for text, prefix in answers]
    return [_record(r) for r in predictor.segment_many([(s.image, s.expression, s.task) for s in samples])]


def predict_image(cfg: Any, predictor: Any = None) -> list[dict[str, Any]]:
    """Segment what each sentence of ``cfg.text`` (one, or a list) refers to in the image file ``cfg.image``.

    Each sentence gets a folder ``cfg.out_dir/<its words>/`` holding ``overlay.png`` (masks, boxes
    and kept points over the image), ``mask.png`` (their union, 0/255; all 0 when the model finds
    no target or its answer is unparseable) and ``result.json`` (the record an evaluation writes).
    Round 1 runs in batches of ``eval.batch_size`` sentences. Returns the records, in order.
    """
    if cfg.task not in ("res", "gres"):
        raise ValueError(f"task={cfg.task!r}: res (one object) or gres (any number, none included)")
    texts = [cfg.text] if isinstance(cfg.text, str) else list(cfg.text)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"text={cfg.text!r}: a sentence, or a list of them (\"text=[the dog,the cat]\")")
    _check_batch_size(cfg)
    path = Path(cfg.image)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path} (image=<path to a JPEG or PNG>)")
    image = load_image(path, exif_orientation=True)  # a photo as its viewer shows it, and its mask.png with it
    predictor = predictor or build_predictor(cfg)
    folders: list[str] = []
    for text in texts:  # a sentence's words; a repeated sentence gets -2, -3, ...
        name = "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:60].strip("-") or "sentence"
        folder, n = name, 1
        while folder in folders:
            n += 1
            folder = f"{name}-{n}"
        folders.append(folder)
    records = []
    for k in range(0, len(texts), cfg.eval.batch_size):
        chunk = slice(k, k + cfg.eval.batch_size)
        results = predictor.segment_many([(image, t, cfg.task) for t in texts[chunk]])
        records += [_write_prediction(image, path, text, result, Path(cfg.out_dir) / folder)  # as each batch ends
                    for text, result, folder in zip(texts[chunk], results, folders[chunk], strict=True)]
    return records


def _write_prediction(image: np.ndarray, path: Path, text: str, result: SegmentResult, out: Path) -> dict[str, Any]:
    """``predict_image``'s three files for one sentence, in ``out``; returns its record."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"image": str(path), "sentence": text, "folder": str(out), **_record(result)}  # text: the answer
    (out / "result.json").write_text(json.dumps(record, indent=1))
    union = result.union(image.shape[:2])
    save_png(out / "mask.png", Image.fromarray(np.zeros(image.shape[:2], np.uint8) if union is None
                                               else union.astype(np.uint8) * 255))
    verdict = "no target" if result.no_target else "" if result.valid else f"unparseable: {result.reason}"
    picture = overlay(image, masks=result.masks, boxes=result.boxes, points=[p for g in result.points for p in g],
                      labels=[lb for g in result.labels for lb in g], scale=display_scale(image.shape, 512),
                      title=verdict or None)
    save_png(out / "overlay.png", side_by_side([picture], text))
    return record


def _vqa_question(question: str) -> str:
    from sam4mllm.dialogs import VQA_PROMPT

    return VQA_PROMPT.format(question=question)


def _check_batch_size(cfg: Any) -> None:
    if cfg.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size={cfg.eval.batch_size}: sentences per round-1 batch must be >= 1")


def evaluate(cfg: Any, predictor: Any = None) -> dict[str, Any] | None:
    """Predict this process's shard; once all shards are in, merge, score and write the reports.

    Returns the metrics (or ``None`` while other shards still run).
    """
    sweep = cfg.eval.get("rethreshold") or []
    pqpp = pqpp_config(cfg)
    floor = max(pqpp.threshold, pqpp.yes_bar)  # every answer above it is in the predictions
    if sweep and (cfg.variant != "pqpp" or min(sweep) < floor):  # before hours of evaluating
        raise ValueError(f"eval.rethreshold={list(sweep)} re-segments PQPP's answers: it needs variant=pqpp and "
                         f"thresholds >= eval.pqpp's thresholds ({floor}), got variant={cfg.variant}")
    _check_batch_size(cfg)
    split = cfg.split or cfg.dataset.split
    ds = build_dataset(cfg.dataset, split)  # missing data fails here, before any model loads
    out_dir = Path(cfg.out_dir)
    header = _header(cfg, split, ds.fingerprint())
    index, count = shard_from_env(cfg.shard.index, cfg.shard.count)
    # Shards get whole images, their sentences in a row, so that an image is decoded, and embedded
    # by the segmenter, once for all its sentences (not once per sentence and shard).
    mine = [i for _, (_, ids) in assign(ds.by_image(), index, count) for i in ids]
    shard_header = {**header, "shard": index, "num_shards": count, "shards_by": "image"}
    with ShardWriter(shard_path(out_dir, index, count), shard_header, map(str, mine)) as w:
        todo = [i for i in mine if str(i) not in w.done]
        if w.retried:
            log.info("%s: retrying %d samples whose data could not be read before", w.path, w.retried)
        if w.adopted:
            log.info("%s: %d samples already predicted by shards of another count", w.path, w.adopted)
        bar = tqdm(todo, desc=f"eval {cfg.dataset.name}/{split} [{index + 1}/{count}]", unit="sample",
                   initial=len(mine) - len(todo), total=len(mine), disable=not cfg.progress)
        batch: list[tuple[int, Any]] = []
        for i, sample in ds.samples(bar):
            if isinstance(sample, Exception):
                w.write({"key": str(i), "index": i, "error": f"{type(sample).__name__}: {sample}", "valid": False})
                continue
            batch.append((i, sample))
            if len(batch) == cfg.eval.batch_size:
                predictor = predictor or build_predictor(cfg)  # not before: a resume may find nothing readable
                _write_batch(w, predictor, batch)
                batch = []
        if batch:
            _write_batch(w, predictor or build_predictor(cfg), batch)
    merged = merge_shards(out_dir, count, len(ds), header, MERGED)
    if merged is None:
        return None
    metrics = rescore(merged, cfg.dataset)
    write_reports(out_dir, metrics)
    if cfg.eval.overlays:
        write_overlays(merged, ds, out_dir / "overlays", cfg.eval.overlays)
    return metrics


def _write_batch(w: ShardWriter, predictor: Any, batch: list[tuple[int, Any]]) -> None:
    """Predict and write a batch; one that runs out of GPU memory (large images, long answers) is
    split in halves and each retried, down to one sentence, whose own failure is raised."""
    try:
        records = predict_samples(predictor, [s for _, s in batch])
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise
        records = None  # retried after the except block: until then the error's frames hold their tensors
    if records is None:
        torch.cuda.empty_cache()
        log.warning("a batch of %d sentences ran out of GPU memory; retrying it in halves (lower eval.batch_size "
                    "if this repeats)", len(batch))
        half = len(batch) // 2
        _write_batch(w, predictor, batch[:half])
        _write_batch(w, predictor, batch[half:])
        return
    for (i, sample), record in zip(batch, records, strict=True):
        w.write({"key": str(i), "index": i, **record, "sample_id": sample.sample_id})


def predicted_mask(record: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    """The union of a prediction record's masks at ``size`` ``(H, W)``; None when it has none."""
    pred = None
    for m in record.get("masks", []):
        dm = decode_segmentation(m, *size)
        pred = dm if pred is None else pred | dm
    return pred


def rescore(predictions: str | Path, dataset_cfg: Any) -> dict[str, Any]:
    """Official metrics of a predictions file against the ground truth, without running any model."""
    header, records = read_shard(Path(predictions))
    ds = build_dataset(dataset_cfg, header["split"])
    if len(records) != len(ds):
        raise ValueError(f"{predictions} has {len(records)} predictions for {len(ds)} samples")
    if ds.skipped:  # entries the loader could not use never reach the predictions: say how many
        log.warning("%s/%s: %d annotation entries skipped while loading: %s", header["dataset"], header["split"],
                    sum(ds.skipped.values()), dict(ds.skipped))
    errors = [r for r in records if "error" in r]
    if errors:
        log.warning("%s: %d of %d samples could not be read and are left out of the metrics, e.g. %s",
                    predictions, len(errors), len(records), errors[0]["error"])
    records = [r for r in records if "error" not in r]
    truncated = sum(bool(r.get("truncated")) for r in records)
    if truncated:  # e.g. a PPG answer for many gRefCOCO targets: its last targets are lost
        log.warning("%s: %d of %d answers reached eval.max_new_tokens without ending and may miss their last "
                    "targets; raise it", predictions, truncated, len(records))
    out: dict[str, Any] = {"dataset": header["dataset"], "split": header["split"], "variant": header["variant"],
                           "skipped": sum(ds.skipped.values()), "unreadable": len(errors), "truncated": truncated}
    if header["task"] == "vqa":
        vqa = VQAMeter()
        for r in records:
            vqa.update(r.get("answer", ""), ds.records[int(r["key"])]["answers"])
        out.update(vqa.compute())
        _compare_official(out, dataset_cfg)
        return out
    meter = SegmentationMeter()
    times, points, right = [], 0, 0
    samples = ds.samples((int(r["key"]) for r in records), strict=True)  # read when predicted: must read now
    for r, (_, sample) in zip(records, samples, strict=True):
        h, w = sample.size
        gt = sample.union_mask()
        meter.update(predicted_mask(r, sample.size), gt, sample.ignore, valid=bool(r.get("valid")),
                     no_target=said_no_target(r.get("no_target"), sample.task))
        if "timings" in r:
            times.append(r["timings"].get("total", 0.0))
        for pts, labels in zip(r.get("points", []), r.get("labels", []), strict=True):
            if len(pts):  # a point label is right when it says what the GT says at that pixel
                xy = np.clip(np.asarray(pts, int), 0, [w - 1, h - 1])
                points += len(xy)
                right += int((gt[xy[:, 1], xy[:, 0]] == np.asarray(labels, bool)).sum())
    out.update(meter.compute())
    _compare_official(out, dataset_cfg)
    out["seconds_per_sample"] = float(np.mean(times)) if times else None
    out["points"], out["points_right"] = points, right / points if points else None
    return out


def _compare_official(metrics: dict[str, Any], dataset_cfg: Any) -> None:
    """Record the split's official sample count as ``official_n`` and warn when fewer or more were scored:
    a figure over part of a split (images missing or unreadable, a subset) is not the published protocol."""
    official = (dataset_cfg.get("official_counts") or {}).get(metrics["split"])
    metrics["official_n"] = official
    if official is not None and metrics["n"] != official:
        log.warning("%s/%s: %d samples scored, the official split has %d: these figures are not comparable with "
                    "published ones", metrics["dataset"], metrics["split"], metrics["n"], official)


Prompts = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def resegment(header: dict[str, Any], records: list[dict[str, Any]], out_dir: str | Path, dataset_cfg: Any,
              segmenter: Any, prompts: Callable[[dict[str, Any], Any], Prompts], overlays: int = 0) -> dict[str, Any]:
    """Segment a predictions file's boxes again with other points, without running the MLLM.

    ``prompts(record, sample)`` gives each box's points, labels and confidences. Writes
    what an evaluation writes (predictions under ``header``, metrics, overlays) to ``out_dir``.
    """
    ds = build_dataset(dataset_cfg, header["split"])
    samples = ds.samples((int(r["key"]) for r in records if r.get("boxes")), strict=True)
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "timings"}  # the MLLM's, and the old segmentation's
        if r.get("boxes"):
            _, s = next(samples)
            points, labels, confidences = prompts(r, s)
            segmenter.set_image(s.image)
            masks = segment_targets(segmenter, np.asarray(r["boxes"], float), points, labels)
            r.update(masks=[encode_rle(m) for m in masks], points=[np.asarray(p).tolist() for p in points],
                     labels=[np.asarray(lb).tolist() for lb in labels],
                     confidences=[np.asarray(c).tolist() for c in confidences])
        out.append(r)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_records(out_dir / MERGED, header, out)
    metrics = rescore(path, dataset_cfg)
    write_reports(out_dir, metrics)
    if overlays:
        write_overlays(path, ds, out_dir / "overlays", overlays)
    return metrics


def confident_answers(record: dict[str, Any], keep: PQPPConfig) -> Prompts:
    """A PQPP record's points, labels and confidences, each box's kept only where ``keep``'s
    thresholds keep the answer (the predictor's filter)."""
    points, labels, confidences = [], [], []
    for p, lb, c in zip(record["points"], record["labels"], record["confidences"], strict=True):
        kept = keep.kept(np.asarray(lb) == 1, np.asarray(c, float))
        points.append(np.asarray(p, float).reshape(-1, 2)[kept])
        labels.append(np.asarray(lb, np.int64)[kept])
        confidences.append(np.asarray(c, float)[kept])
    return points, labels, confidences


def rethreshold(predictions: str | Path, out_dir: str | Path, dataset_cfg: Any, segmenter: Any, threshold: float,
                overlays: int = 0, yes_threshold: float | None = None) -> dict[str, Any]:
    """A PQPP evaluation at another point-filter threshold (paper Table 6a) without the MLLM.

    Keeps the answers more confident than ``threshold`` (a ``Yes``: than ``yes_threshold``,
    when given) and segments again: exactly what evaluating at these thresholds gives,
    provided ``predictions`` was evaluated at thresholds no higher (``eval.pqpp.threshold=0``
    keeps every answer).
    """
    header, records = read_shard(Path(predictions))
    if header.get("variant") != "pqpp" or "pqpp_threshold" not in header:
        raise ValueError(f"{predictions} is not a PQPP evaluation that records its point threshold "
                         f"(variant {header.get('variant')!r}); evaluate again with variant=pqpp")
    keep = PQPPConfig(threshold=threshold, yes_threshold=yes_threshold)
    no, yes = header["pqpp_threshold"], header.get("pqpp_yes_threshold", header["pqpp_threshold"])
    if keep.threshold < no or keep.yes_bar < yes:
        raise ValueError(f"{predictions} keeps only the answers more confident than {no} (No) / {yes} (Yes); "
                         f"{keep.threshold} / {keep.yes_bar} needs the ones it dropped: evaluate with "
                         f"eval.pqpp.threshold={min(keep.threshold, keep.yes_bar)} or lower (0 keeps every answer)")
    return resegment({**header, **_thresholds(keep)}, records, out_dir, dataset_cfg, segmenter,
                     lambda r, sample: confident_answers(r, keep), overlays)


def threshold_sweep(cfg: Any, segmenter: Any = None) -> list[dict[str, Any]]:
    """:func:`rethreshold` of the evaluation in ``cfg.out_dir`` at each of ``cfg.eval.rethreshold``,
    into sibling folders ``thr<t>`` (the names of the Table 6 configs, with the ``weights_tag`` of the
    evaluation's checkpoint); their metrics."""
    segmenter = segmenter or build(cfg.sam)
    out = Path(cfg.out_dir)
    return [{"threshold": t, **rethreshold(out / MERGED, out.parent / f"thr{t:g}{cfg.weights_tag}", cfg.dataset,
                                           segmenter, t)}
            for t in cfg.eval.rethreshold]


def write_reports(out_dir: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` and a one-row ``metrics.md``."""
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    keys = [k for k in metrics if k not in ("dataset", "split", "variant")]
    table = markdown_table(["dataset", "split", "variant", *keys],
                           [[metrics["dataset"], metrics["split"], metrics["variant"], *(metrics[k] for k in keys)]])
    (out_dir / "metrics.md").write_text(table + "\n")


def write_overlays(predictions: Path, ds: Any, out_dir: Path, n: int) -> list[Path]:
    """Overlay PNGs of ``n`` samples spread over the split: the ground truth (left; ignored pixels
    grey) beside the prediction (right: its masks, boxes and kept points, titled with the sample's IoU)."""
    records = [r for r in iter_records(predictions) if "error" not in r and "masks" in r]
    paths = []
    for r in (records[i] for i in spread(len(records), n)):
        sample = ds[int(r["key"])]
        masks = [decode_segmentation(m, *sample.size) for m in r["masks"]]
        score = score_sample(np.any(masks, 0) if masks else None, sample.union_mask(), sample.ignore,
                             said_no_target(r.get("no_target"), sample.task))
        verdict = ("no target" if r.get("no_target") else f"IoU {score.iou:.3f}") + (
            "" if r["valid"] else f", invalid: {r['reason']}")
        scale = display_scale(sample.image.shape)
        gt = overlay(sample.image, masks=sample.masks, boxes=sample.boxes, scale=scale, ignore=sample.ignore,
                     title="ground truth" if sample.masks else "ground truth: no target")
        pred = overlay(sample.image, masks=masks, boxes=r["boxes"], points=[p for g in r["points"] for p in g],
                       labels=[lb for g in r["labels"] for lb in g], scale=scale, title=f"prediction: {verdict}")
        paths.append(save_png(out_dir / f"{int(r['index']):05d}.png", side_by_side([gt, pred], sample.expression)))
    return paths
