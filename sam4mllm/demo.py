"""``run_demo(cfg)``: the embedded default end to end on the CPU.

1. generate the synthetic benchmark;
2. PPG and PQPP labels with the offline segmenter;
3. train a tiny PPG and a tiny PQPP model through the deepspeed launcher (2 CPU ranks);
4. evaluate PPG, PQPP and box-only (PQPP's round-1 boxes without its points) on synthetic
   val, RES and GRES, next to trivial baselines (whole image; centre box -> segmenter) and
   oracles: GT box -> segmenter (box-only's ceiling), GT box + GT-derived points ->
   segmenter (the segmenter's), and PQPP's boxes with its points answered from the GT
   masks (what a perfect points round would add to these boxes);
5. print one table and write it, with overlays, to the demo folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sam4mllm import CONFIG_DIR
from sam4mllm.config import build
from sam4mllm.data import build_dataset
from sam4mllm.data.synthetic import generate_synthetic
from sam4mllm.evaluate import MERGED, evaluate, pqpp_config, resegment, rethreshold
from sam4mllm.inference import PQPPConfig, SegmentResult, sample_points, segment_targets
from sam4mllm.labels import generate_labels, pixels_in_box
from sam4mllm.metrics import SegmentationMeter, said_no_target
from sam4mllm.report import markdown_table
from sam4mllm.shards import read_shard

log = logging.getLogger(__name__)
ROOT = CONFIG_DIR.parent
VIEWS = {"RES": "synthetic", "GRES": "synthetic_gres"}
COLUMNS = ["method", "RES cIoU", "RES gIoU", "GRES cIoU", "GRES gIoU", "N-acc", "T-acc", "parse failures"]
SWEEP_COLUMNS = ["point-filter threshold", *(f"{v} {k}" for v in VIEWS for k in ("cIoU", "points kept", "kept right"))]


def compose_config(name: str, overrides: list[str]) -> Any:
    """Another primary config of this tree (inside ``@hydra.main`` Hydra is already set up)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _afresh_if_stale(stage: Callable[[Any], Any], stage_cfg: Any) -> Any:
    """Run a resumable stage; outputs it finds from other inputs (a regenerated benchmark, a
    retrained model) make it raise ``FileExistsError``, and the demo then redoes the stage."""
    try:
        return stage(stage_cfg)
    except FileExistsError as err:
        log.warning("%s -- redoing this stage", err)
        shutil.rmtree(stage_cfg.out_dir)
        return stage(stage_cfg)


def _share_cores(workers: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _workers(n: int) -> ProcessPoolExecutor | None:
    """Processes that run the shards of label and evaluation jobs, started once (imports
    take seconds) and shared by every job; ``None`` for one process."""
    if n < 2:
        return None
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_share_cores,
                               initargs=(n,))


def _sharded(stage: Callable[[Any], Any], config: str, overrides: list[str], pool: Executor | None,
             shards: int) -> Any:
    """A resumable job (labels, evaluation) as ``shards`` shards run at once by ``pool``'s workers
    (one shard in this process without a pool).

    Returns the merged result, which the last shard to finish writes (the same bytes
    whichever shard that is, and the same as one process's).
    """
    shards = shards if pool else 1
    cfgs = [compose_config(config, [*overrides, f"shard.index={i}", f"shard.count={shards}", f"progress={i == 0}"])
            for i in range(shards)]

    def run(_: Any) -> Any:
        if pool is None:
            return stage(cfgs[0])
        jobs = [pool.submit(stage, c) for c in cfgs]
        # Every shard must have stopped before a stale stage's folder is cleared and the
        # stage redone: a shard still running would write into the new run's files.
        wait(jobs)
        return next(r for r in (j.result() for j in jobs) if r is not None)

    return _afresh_if_stale(run, cfgs[0])


def _launch_training(cfg: Any, variant: str, common: list[str], labels: list[Path]) -> Path:
    """``deepspeed --num_gpus N scripts/train.py +exp=<variant> ...``; returns the run folder.

    A finished run is reused, and a killed one resumed from its last checkpoint, only if it
    was started from the same config, tiny model (its spec digest) and labels (their headers
    carry the benchmark's hash); otherwise it is trained afresh.
    """
    from sam4mllm.models.tiny import TinySpec

    run_dir = Path(cfg.out_dir) / "runs" / variant
    overrides = [f"+exp={variant}", f"run_dir={run_dir}", *common, f"train.save_every={cfg.checkpoint_every}",
                 "train.keep_checkpoints=1", *cfg.train_overrides.get(variant, [])]
    train_cfg = OmegaConf.to_container(compose_config("train", overrides), resolve=True)
    for key in ("logger", "progress"):  # how a run reports or saves, not what it learns
        train_cfg.pop(key)
    for key in ("save_every", "keep_checkpoints"):
        train_cfg["train"].pop(key)
    model = train_cfg["model"]
    tiny = TinySpec(family=model["family"], **model["tiny"]).digest() if model.get("tiny") else None
    inputs = {"train": train_cfg, "tiny_model": tiny, "labels": [read_shard(p)[0] for p in labels]}
    stamp = {"digest": hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    # Beside the run folder, not in it: the trainer starts afresh only in an empty folder.
    stamp_path = run_dir.parent / f"{variant}.demo_inputs.json"
    same = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp
    if same and (run_dir / "final" / "sam4mllm.json").exists():
        log.info("%s: trained model found in %s, skipping training", variant, run_dir)
        return run_dir
    resume = same and (run_dir / "checkpoints" / "latest").exists()
    if resume:
        print(f"{variant}: resuming the interrupted run in {run_dir} from its last checkpoint", flush=True)
    elif run_dir.exists():  # killed before its first checkpoint, or trained from other inputs
        log.info("%s: %s is unfinished or from other inputs; training afresh", variant, run_dir)
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp))
    from sam4mllm.training.launch import free_port

    overrides += ["resume=true"] if resume else []
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(cfg.ranks),
                "--master_port", str(free_port())]  # another run may hold the default port
    script = str(ROOT / "scripts" / "train.py")
    cmd = [*launcher, script, *overrides] if cfg.deepspeed else [sys.executable, script, "deepspeed=none", *overrides]
    print(f"\n== training {variant}: {' '.join(cmd[1:])}", flush=True)
    # In the caller's directory, against which the demo's relative paths (data, outputs, run_dir) resolve.
    # The launcher counts CPU ranks, not GPUs, even where there are some (the ranks train on the CPU).
    subprocess.run(cmd, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return run_dir


def score_baseline(dataset_cfg: Any, predict: Callable[[Any], SegmentResult]) -> dict[str, Any]:
    """cIoU, gIoU, N-acc, ... of a predictor that needs no MLLM on a dataset config's split (val by default)."""
    ds = build_dataset(dataset_cfg)
    meter = SegmentationMeter()
    for s in ds:
        r = predict(s)
        meter.update(r.union(s.size), s.union_mask(), s.ignore, valid=r.valid,
                     no_target=said_no_target(r.no_target, s.task))
    return meter.compute()


def baselines(segmenter: Any, seed: int) -> dict[str, Callable[[Any], SegmentResult]]:
    """Predictors that need no MLLM: whole image, centre box, and GT-prompted oracles (GT box
    alone: the ceiling of box-only; GT box + points: the segmenter's)."""
    rng = np.random.default_rng(seed)

    def whole(s: Any) -> SegmentResult:
        return SegmentResult([np.ones(s.size, bool)], np.array([[0, 0, s.size[1], s.size[0]]], float))

    def centre(s: Any) -> SegmentResult:
        h, w = s.size
        box = np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])
        segmenter.set_image(s.image)
        return SegmentResult(list(segmenter.predict(box).masks), box)

    def oracle(with_points: bool) -> Callable[[Any], SegmentResult]:
        def predict(s: Any) -> SegmentResult:
            if not s.masks:
                return SegmentResult([], np.zeros((0, 4)), no_target=True)
            segmenter.set_image(s.image)
            pts, labels = [], []
            targets = zip(s.masks, s.boxes, strict=True) if with_points else []
            for m, b in targets:
                pos, neg = pixels_in_box(m, b, True), pixels_in_box(m, b, False)
                chosen = [pos[rng.integers(len(pos))] for _ in range(2)]
                chosen += [neg[rng.integers(len(neg))]] if len(neg) else []
                pts.append(np.array(chosen, float))
                labels.append(np.array([1, 1, 0][: len(chosen)]))
            return SegmentResult(segment_targets(segmenter, s.boxes, pts, labels), s.boxes)
        return predict

    return {"whole image": whole, "centre box -> segmenter": centre, "oracle: GT box -> segmenter": oracle(False),
            "oracle: GT box + points -> segmenter": oracle(True)}


def from_pqpp_boxes(pqpp_dir: Path, out_dir: Path, dataset_cfg: Any, segmenter: Any, overlays: int,
                    oracle_points: PQPPConfig | None = None) -> dict[str, Any]:
    """Re-segment a PQPP evaluation's own round-1 boxes: without points (box-only), or with
    ``oracle_points`` -- round 2's points answered by the GT masks instead of the model (the
    same grid with ``sampling=grid``; other random points with ``sampling=random``).

    Round 1 is the same greedy generation in both variants, so the first equals evaluating
    ``variant=box_only`` without running the model again; the second is what a perfect
    points round would make of these boxes. Writes the files an evaluation does
    (predictions, metrics, overlays) to ``out_dir``.
    """
    header, records = read_shard(Path(pqpp_dir) / MERGED)

    def points(r: dict[str, Any], s: Any) -> tuple[list, list, list]:
        if oracle_points is None:
            return [], [], []
        gt = s.union_mask()
        pts = [sample_points(b, s.size, oracle_points, np.random.default_rng(0)) for b in np.asarray(r["boxes"])]
        labels = [gt[p[:, 1], p[:, 0]].astype(np.int64) for p in pts]
        return pts, labels, [np.ones(len(p)) for p in pts]

    variant = "box_only" if oracle_points is None else "pqpp_oracle_points"
    header = {k: v for k, v in header.items() if k not in ("pqpp_threshold", "pqpp_yes_threshold")}
    return resegment({**header, "variant": variant}, records, out_dir, dataset_cfg, segmenter, points, overlays)


def _row(name: str, res: dict[str, Any], gres: dict[str, Any]) -> list[Any]:
    n_res, n_gres = res["n"], gres["n"]
    invalid = (res["invalid_rate"] * n_res + gres["invalid_rate"] * n_gres) / (n_res + n_gres)
    return [name, res["cIoU"], res["gIoU"], gres["cIoU"], gres["gIoU"], gres["N-acc"], gres["T-acc"], invalid]


def check_targets(rows: list[list[Any]], min_pqpp: float, min_n_acc: float) -> list[tuple[bool, str]]:
    """The demo's claims against its table: ``(met, line)`` each. The ordering PQPP > PPG >
    box-only > best trivial baseline must hold in RES and GRES cIoU, and so PQPP > box-only,
    which is checked too (do the points help?); PQPP's floor is on RES."""
    by = {r[0]: r for r in rows}
    res, gres, n_acc = COLUMNS.index("RES cIoU"), COLUMNS.index("GRES cIoU"), COLUMNS.index("N-acc")
    named = {"PQPP": "SAM4MLLM-PQPP", "PPG": "SAM4MLLM-PPG", "box-only": "box-only (PQPP model, round 1)"}

    def value(name: str, col: int) -> float:  # the best trivial baseline is the best in each column
        trivial = ("whole image", "centre box -> segmenter")
        return max(by[n][col] for n in trivial) if name == "best trivial baseline" else by[named[name]][col]

    out = [(value("PQPP", res) >= min_pqpp, f"PQPP RES cIoU >= {min_pqpp:g}: {value('PQPP', res):.3f}")]
    n = {k: value(k, n_acc) for k in ("PPG", "PQPP")}
    out.append((min(n.values()) >= min_n_acc, f"N-acc >= {min_n_acc:g}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in n.items())))
    for hi, lo in [("PQPP", "PPG"), ("PPG", "box-only"), ("PQPP", "box-only"), ("box-only", "best trivial baseline")]:
        (a, b), (c, d) = ((value(hi, col), value(lo, col)) for col in (res, gres))
        out.append((a > b and c > d, f"{hi} > {lo}: RES {a:.3f} vs {b:.3f}, GRES {c:.3f} vs {d:.3f}"))
    return out


def run_demo(cfg: Any) -> list[list[Any]]:
    """Run every stage (skipping finished ones) and return the table rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.paths.data_dir)
    print("== 1. synthetic benchmark", flush=True)
    generate_synthetic(data_dir / "synthetic", build(cfg.synthetic))
    paths = [f"paths.data_dir={data_dir}", f"paths.output_dir={cfg.paths.output_dir}"]
    # The demo is the CPU proof and its table is the CPU's, also on a machine with GPUs.
    common = [*paths, f"model={cfg.backbone}", "model.device=cpu", *cfg.model_overrides]
    with _workers(cfg.ranks) or contextlib.nullcontext() as pool:
        print("== 2. PPG and PQPP labels with the offline segmenter", flush=True)
        labels = {variant: [_sharded(generate_labels, "gen_labels", [
            *paths, f"seed={cfg.seed}", f"+exp={variant}", f"dataset={view}", *cfg.label_overrides.get(variant, [])],
            pool if variant == "ppg" else None, cfg.ranks)  # PQPP labels need no segmenter: one process will do
            for view in VIEWS.values()] for variant in ("ppg", "pqpp")}
        print("== 3. training (deepspeed, CPU ranks)", flush=True)
        seeded = [*common, f"train.seed={cfg.seed}"]
        runs = {"ppg": _launch_training(cfg, "ppg", seeded, labels["ppg"]),
                "pqpp": _launch_training(cfg, "pqpp", [*seeded, f"pqpp_mode={cfg.pqpp_mode}"], labels["pqpp"])}
        print("== 4. evaluation on synthetic val", flush=True)
        datasets = [compose_config("eval", [*common, f"dataset={view}"]).dataset for view in VIEWS.values()]
        evaluated = [*common, f"seed={cfg.seed}"]
        asked = "joint" if cfg.pqpp_mode == "joint" else "per_point"  # branch-trained points are asked one by one
        eval_cfg = compose_config("eval", [*evaluated, *cfg.eval_overrides])  # what every evaluation shares
        segmenter = build(eval_cfg.sam)
        rows = [_row(name, *(score_baseline(d, predict) for d in datasets))
                for name, predict in baselines(segmenter, cfg.seed).items()]
        # PQPP keeps every answer here; each threshold's result is then re-segmented from it.
        learned = {folder: [_sharded(evaluate, "eval", [
            *evaluated, f"dataset={view}", f"variant={variant}", f"checkpoint={runs[variant] / 'final'}",
            f"out_dir={out / 'eval' / folder / view}", f"eval.pqpp.mode={asked}", *cfg.eval_overrides, *extra],
            pool, cfg.ranks) for view in VIEWS.values()]
            for variant, folder, extra in [("ppg", "ppg", [f"eval.overlays={cfg.overlays}"]),
                                           ("pqpp", "pqpp_all", ["eval.overlays=0", "eval.pqpp.threshold=0",
                                                                     "eval.pqpp.yes_threshold=null"])]}
    views = list(zip(VIEWS.values(), datasets, strict=True))
    every = [out / "eval" / "pqpp_all" / view / MERGED for view in VIEWS.values()]

    grid = pqpp_config(eval_cfg)  # the points PQPP asked about
    derived = {name: [from_pqpp_boxes(p.parent, out / "eval" / folder / view, d, segmenter, cfg.overlays, points)
                      for p, (view, d) in zip(every, views, strict=True)]
               for name, folder, points in [("box-only (PQPP model, round 1)", "box_only", None),
                                            ("PQPP boxes + GT point answers", "pqpp_oracle_points", grid)]}
    # Each threshold re-segmented once; the table's own (paper: 0.9) into eval/pqpp/ with its overlays.
    swept = {t: [rethreshold(p, out / "eval" / ("pqpp" if t == grid.threshold else f"pqpp_thr{t:g}") / view, d,
                             segmenter, t, cfg.overlays if t == grid.threshold else 0,
                             grid.yes_threshold if t == grid.threshold else None)
                 for p, (view, d) in zip(every, views, strict=True)]
             for t in sorted({*cfg.thresholds, grid.threshold})}
    rows += [_row(name, *derived[name]) for name in derived]
    rows += [_row("SAM4MLLM-PPG", *learned["ppg"]), _row("SAM4MLLM-PQPP", *swept[grid.threshold])]
    table = markdown_table(COLUMNS, rows, digits=3)
    print("\n== 5. results on synthetic val (RES: one target per sentence; GRES: multi- and no-target)\n")
    print(table)
    table_row = f"{grid.threshold:g}" + ("" if grid.yes_threshold is None else f" (Yes: {grid.yes_threshold:g})")
    sweep = [["every answer", *learned["pqpp_all"]],
             *([table_row if t == grid.threshold else f"{t:g}", *swept[t]] for t in cfg.thresholds),
             ["none (box-only)", *derived["box-only (PQPP model, round 1)"]]]
    sweep = [[name, *(m[k] for m in per_view for k in ("cIoU", "points", "points_right"))] for name, *per_view in sweep]
    sweep_table = markdown_table(SWEEP_COLUMNS, sweep, digits=3)
    print(f"\nPQPP's points kept by the point-filter threshold (paper Table 6a; the table: {table_row}),"
          " re-segmented from one evaluation that kept every answer; 'right': the GT agrees at the point\n")
    print(sweep_table)
    targets = check_targets(rows, cfg.targets.pqpp_ciou, cfg.targets.n_acc)
    checks = "\n".join(f"- {'met' if ok else '**not met**'}: {line}" for ok, line in targets)
    print(f"\nThe demo's targets (README, 'The CPU demo'):\n\n{checks}")
    (out / "results.md").write_text(table + "\n\n" + sweep_table + "\n\n" + checks + "\n")
    (out / "results.json").write_text(json.dumps({"columns": COLUMNS, "rows": rows, "sweep_columns": SWEEP_COLUMNS,
                                                  "sweep": sweep, "targets": [{"met": ok, "check": line}
                                                                              for ok, line in targets],
                                                  "config": OmegaConf.to_container(cfg, resolve=True)},
                                                 indent=1))
    print(f"\nOverlays: {out / 'eval'}/<variant>/<view>/overlays/*.png; of the training labels: "
          f"{labels['ppg'][0].parents[3]}/<variant>/<view>/train/overlays/*.png")
    first = build_dataset(datasets[0], "val").records[0]  # any image and sentence will do
    print(f"One image through the trained PQPP model: python scripts/predict.py image={first['image_path']} "
          f"\"text='{first['expression']}'\" model={cfg.backbone} paths.output_dir={cfg.paths.output_dir} "
          f"checkpoint={runs['pqpp'] / 'final'}")
    return rows
