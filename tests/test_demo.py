"""The embedded default end to end, reduced: the demo pipeline on a small synthetic set.

The end-to-end test is marked slow. It runs the same stages as `make demo` (labels,
training through the deepspeed launcher on 2 CPU ranks, evaluation, the table) on a
smaller benchmark and a short training, so it checks the plumbing and determinism, not
the accuracy targets. Whether training teaches the model anything is checked by the
learning test (held-out val, `make test-learning`) and, in CI, by its reduced version
(fitting 8 training images).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.demo import COLUMNS, check_targets, run_demo


def _cfg(tmp_path, out):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="demo", overrides=[
            f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'outputs'}", f"out_dir={out}",
            "synthetic.images={train:12,val:2,testA:1,testB:1}", "synthetic.reason_images={}",
            "train_overrides.ppg=['train.max_steps=2']", "train_overrides.pqpp=['train.max_steps=2']", "overlays=2",
            "eval_overrides=['eval.max_new_tokens=24']"])


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end_and_is_deterministic(tmp_path, capsys):
    rows = run_demo(_cfg(tmp_path, tmp_path / "demo_a"))
    names = [r[0] for r in rows]
    assert names == ["whole image", "centre box -> segmenter", "oracle: GT box -> segmenter",
                     "oracle: GT box + points -> segmenter", "box-only (PQPP model, round 1)",
                     "PQPP boxes + GT point answers", "SAM4MLLM-PPG", "SAM4MLLM-PQPP"]
    assert all(len(r) == len(COLUMNS) for r in rows)
    whole, gt_box, oracle = rows[0], rows[2], rows[3]
    assert oracle[1] > 0.9 and oracle[5] == 1.0 and whole[1] < 0.5  # the segmenter's ceiling and the floor
    assert gt_box[1] > 0.9 and gt_box[5] == 1.0
    printed = capsys.readouterr().out
    assert "| SAM4MLLM-PQPP" in printed
    # The label overlays are where the demo says they are, for both variants and views.
    labels = re.search(r"of the training labels: (\S+)/<variant>/<view>/train/overlays", printed).group(1)
    assert all(list(Path(labels, v, view, "train", "overlays").glob("*.png"))
               for v in ("ppg", "pqpp") for view in ("synthetic", "synthetic_gres"))
    assert list((tmp_path / "demo_a" / "eval" / "pqpp" / "synthetic" / "overlays").glob("*.png"))
    # Same seed, fresh run folder (training reused only through the run folder): the same table.
    again = run_demo(_cfg(tmp_path, tmp_path / "demo_b"))
    assert json.dumps(again) == json.dumps(rows)


def test_target_checks_judge_each_claim_in_both_views_against_the_best_trivial_baseline_of_each():
    def row(name, res, gres, n_acc=1.0):
        return [name, res, 0.0, gres, 0.0, n_acc, 0.0, 0.0]

    rows = [row("whole image", 0.1, 0.5), row("centre box -> segmenter", 0.6, 0.3),
            row("box-only (PQPP model, round 1)", 0.7, 0.55), row("SAM4MLLM-PPG", 0.8, 0.6, 0.9),
            row("SAM4MLLM-PQPP", 0.9, 0.7)]
    assert [ok for ok, _ in check_targets(rows, 0.7, 0.8)] == [True] * 6
    rows[2][3] = 0.45  # box-only's GRES: above the centre box, below the whole image (GRES's best)
    rows[3][5] = 0.75  # PPG's N-acc
    rows[4][1] = 0.65  # PQPP's RES: below the floor, PPG and box-only
    got = check_targets(rows, 0.7, 0.8)
    assert [ok for ok, _ in got] == [False, False, False, True, False, False]
    assert got[5][1] == "box-only > best trivial baseline: RES 0.700 vs 0.600, GRES 0.450 vs 0.500"


def _script(cmd: list[str]) -> int:
    """Where train.py is in a launch command."""
    return next(i for i, a in enumerate(cmd) if a.endswith("train.py"))


def _run_dir(cmd: list[str]) -> Path:
    return Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])


def _fake_launcher(launched: list):
    """Stands in for the deepspeed launcher: records the command and leaves a finished run.

    It works in the directory it is started in, as the real one does: the demo's relative
    paths are the caller's, so that must be the caller's directory.
    """
    def run(cmd, cwd=None, **kwargs):
        assert cwd is None or Path(cwd).resolve() == Path.cwd(), f"trains in {cwd}, not in {Path.cwd()}"
        assert Path(cmd[_script(cmd)]).is_file()
        run_dir = _run_dir(cmd)
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "sam4mllm.json").write_text("{}")
        launched.append(cmd)
    return run


def test_a_finished_run_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    import sam4mllm.demo as demo

    trained = []
    monkeypatch.setattr(demo.subprocess, "run", _fake_launcher(trained))
    cfg = _cfg(tmp_path, tmp_path / "demo")
    common = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'outputs'}", "model=demo_qwen2vl"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"header": {"data": "benchmark v1"}}) + "\n")
    for expect in (1, 1):  # trained once, then reused
        demo._launch_training(cfg, "ppg", common, [labels])
        assert len(trained) == expect
    labels.write_text(json.dumps({"header": {"data": "benchmark v2"}}) + "\n")  # labels of a regenerated benchmark
    demo._launch_training(cfg, "ppg", common, [labels])
    assert len(trained) == 2
    cfg.train_overrides.ppg = ["train.max_steps=3"]  # another training setting
    demo._launch_training(cfg, "ppg", common, [labels])
    assert len(trained) == 3
    (tmp_path / "demo" / "runs" / "ppg.demo_inputs.json").unlink()  # a run without the record (older demo)
    demo._launch_training(cfg, "ppg", common, [labels])
    assert len(trained) == 4


def test_the_demo_run_from_another_directory_trains_on_and_into_that_directory(tmp_path, monkeypatch):
    """Relative paths (the defaults are) are the caller's: training must not resolve them elsewhere."""
    import sam4mllm.demo as demo

    trained = []
    monkeypatch.setattr(demo.subprocess, "run", _fake_launcher(trained))
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="demo")  # data/demo, outputs/demo: relative
    common = [f"paths.data_dir={cfg.paths.data_dir}", f"paths.output_dir={cfg.paths.output_dir}", "model=demo_qwen2vl"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"header": {"data": "benchmark"}}) + "\n")
    for _ in range(2):  # trained once, then found where it was trained
        run_dir = demo._launch_training(cfg, "ppg", common, [labels])
    assert len(trained) == 1 and not run_dir.is_absolute()
    assert (tmp_path / run_dir / "final" / "sam4mllm.json").exists()


def test_a_killed_training_is_resumed_from_its_checkpoint_only_for_the_same_inputs(tmp_path, monkeypatch):
    """The launcher's side (that a resumed run follows the same curve) is tested in test_training.py."""
    import sam4mllm.demo as demo

    launched, finish = [], _fake_launcher([])

    def killed_after_a_checkpoint(cmd, **kwargs):  # the first launch of each run dies after its first checkpoint
        launched.append(cmd)
        run_dir = _run_dir(cmd)
        if (run_dir / "checkpoints").exists():
            return finish(cmd, **kwargs)
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "latest").write_text("step-0000120")
        raise subprocess.CalledProcessError(-9, cmd)

    monkeypatch.setattr(demo.subprocess, "run", killed_after_a_checkpoint)
    cfg = _cfg(tmp_path, tmp_path / "demo")
    common = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'outputs'}", "model=demo_qwen2vl"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"header": {"data": "benchmark v1"}}) + "\n")
    with pytest.raises(subprocess.CalledProcessError):
        demo._launch_training(cfg, "ppg", common, [labels])
    assert "resume=true" not in launched[-1] and f"train.save_every={cfg.checkpoint_every}" in launched[-1]
    run_dir = demo._launch_training(cfg, "ppg", common, [labels])  # the demo run again: the same inputs
    args = [cmd[_script(cmd):] for cmd in launched]  # the port is chosen afresh each time
    assert args[1] == [*args[0], "resume=true"]
    assert (run_dir / "final" / "sam4mllm.json").exists()
    # Killed again, then restarted from other labels: the checkpoint is not theirs, so the run starts afresh.
    shutil.rmtree(run_dir / "final")
    labels.write_text(json.dumps({"header": {"data": "benchmark v2"}}) + "\n")
    with pytest.raises(subprocess.CalledProcessError):
        demo._launch_training(cfg, "ppg", common, [labels])
    assert "resume=true" not in launched[-1] and len(launched) == 3


def test_the_demo_seed_and_the_cpu_reach_labels_training_and_evaluation(tmp_path, monkeypatch):
    """The seed reaches every job; training and evaluation stay on the CPU even where CUDA exists."""
    import sam4mllm.demo as demo

    jobs, launched = [], []

    class Stop(Exception):
        pass

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"header": {"data": "benchmark"}}) + "\n")

    def fake_sharded(stage, config, overrides, pool, shards):  # records what each job would be composed from
        jobs.append((config, overrides))
        return labels if config == "gen_labels" else None

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(demo, "_sharded", fake_sharded)
    fake, envs = _fake_launcher(launched), []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: (envs.append(kw.get("env") or {}), fake(cmd, **kw)))
    monkeypatch.setattr(demo, "baselines", lambda segmenter, seed: {})
    monkeypatch.setattr(demo, "from_pqpp_boxes", stop)
    cfg = _cfg(tmp_path, tmp_path / "demo")
    cfg.seed = 7
    with pytest.raises(Stop):
        run_demo(cfg)
    jobs += [("train", cmd[_script(cmd) + 1:]) for cmd in launched]  # what train.py is given
    assert sorted({name for name, _ in jobs}) == ["eval", "gen_labels", "train"]
    for name, overrides in jobs:
        composed = demo.compose_config(name, overrides)
        assert (composed.train.seed if name == "train" else composed.seed) == 7, name
        if name != "gen_labels":
            assert composed.model.device == "cpu", name
    assert len(envs) == 2 and all(e.get("DS_ACCELERATOR") == "cpu" for e in envs)  # the launcher counts CPU ranks


def test_a_stale_sharded_stage_is_cleared_only_after_every_shard_stopped(tmp_path, monkeypatch):
    """Shard 0 finds outputs from other inputs at once while shard 1 is still working: the
    folder must not be cleared (and the stage redone) until shard 1 has stopped, or it
    would write into the redone stage's files (seen as duplicate labels)."""
    import sam4mllm.demo as demo

    events, cleared = [], []

    def stage(cfg):
        if not cleared:  # the first attempt
            if cfg.shard.index == 0:
                raise FileExistsError("outputs from other inputs")
            time.sleep(0.3)
            events.append("shard 1 stopped")
            return None
        return "merged" if cfg.shard.index == 0 else None

    def rmtree(path):
        events.append("cleared")
        cleared.append(path)

    monkeypatch.setattr(demo.shutil, "rmtree", rmtree)
    with ThreadPoolExecutor(2) as pool:
        got = demo._sharded(stage, "gen_labels", ["+exp=pqpp", f"out_dir={tmp_path}"], pool, 2)
    assert got == "merged" and events == ["shard 1 stopped", "cleared"]


def _train_and_score_pqpp(tmp_path, images: str, n_points: int, train: list[str], evaluation: list[str], split: str):
    """Train PQPP from random init with the demo's model, optimiser and learning-rate schedule on
    the demo's benchmark (RES only, one process), then score on ``split``: ``(PQPP cIoU, its
    round-1 boxes alone re-segmented, {trivial baseline: cIoU})``."""
    from hydra.utils import instantiate

    from sam4mllm.data.synthetic import generate_synthetic
    from sam4mllm.demo import baselines, compose_config, from_pqpp_boxes, score_baseline
    from sam4mllm.evaluate import evaluate
    from sam4mllm.labels import generate_labels
    from sam4mllm.training.trainer import train as train_run

    demo = compose_config("demo", [f"paths.root_dir={tmp_path}", "synthetic.reason_images={}",
                                   f"synthetic.images={images}"])
    generate_synthetic(Path(demo.paths.data_dir) / "synthetic", instantiate(demo.synthetic))  # the demo's benchmark
    paths = [f"paths.data_dir={demo.paths.data_dir}", f"paths.output_dir={demo.paths.output_dir}"]
    for view in ("synthetic", "synthetic_gres"):  # the mixture reads both; GRES is switched off below
        generate_labels(compose_config("gen_labels", [*paths, "+exp=pqpp", f"dataset={view}",
                                                      f"labels.n_points={n_points}", "shard.index=0",
                                                      "shard.count=1", "progress=false"]))
    model = ["model=demo_qwen3vl"]  # the demo's model and optimiser (AdamW 1e-3)
    run = tmp_path / "run"
    train_run(compose_config("train", [
        *paths, *model, "+exp=pqpp", "deepspeed=none", f"run_dir={run}", "progress=false", *train,
        # RES only: no-target sentences slow localising down (docs/cpu_demo_history.md).
        "data.sources.grefcoco.ratio=0", "data.sources.vqav2.ratio=0"]))
    cfg = compose_config("eval", [*paths, *model, "variant=pqpp", f"checkpoint={run / 'final'}",
                                  f"dataset.split={split}", f"out_dir={tmp_path / 'eval'}", "eval.overlays=0",
                                  "progress=false", *evaluation])
    learned = evaluate(cfg)["cIoU"]
    segmenter = instantiate(cfg.sam)
    box_only = from_pqpp_boxes(tmp_path / "eval", tmp_path / "box_only", cfg.dataset, segmenter, 0)["cIoU"]
    trivial = {name: score_baseline(cfg.dataset, predict)["cIoU"]
               for name, predict in baselines(segmenter, 0).items() if not name.startswith("oracle")}
    print(f"learned PQPP cIoU {learned:.3f}, its boxes alone {box_only:.3f}; trivial {trivial}")
    return learned, box_only, trivial


@pytest.mark.slow
def test_tiny_pqpp_fits_its_training_images_through_the_whole_pipeline(tmp_path):
    """CI's reduced learning test: 100 steps on 8 images, scored on those same images.

    Fitting them is not generalising (the learning test below, not in CI, scores held-out
    val), but it fails when anything between the labels and the masks loses what was
    learned: the label coordinates, the dialogs and their loss mask, the trainer, the
    checkpoint, the parser, the coordinate conversion or the segmenter. About 50 s.
    """
    learned, box_only, trivial = _train_and_score_pqpp(
        tmp_path, "{train:8,val:1,testA:1,testB:1}", 5,
        ["pqpp_mode=branch", "train.max_steps=100", "train.micro_batch_size=8"], [], "train")
    # measured: boxes alone 1.000, PQPP 0.934, centre box 0.671 (the dialog round, 2 points: 1.000, 0.872)
    assert box_only >= 0.95
    assert learned >= max(trivial.values()) + 0.15


def test_a_baseline_scores_no_target_only_when_it_answers_no_target(workspace):
    """gRefCOCO rules as the GRES official code reads them: a box whose mask comes out empty is not a
    "no target" answer (no N-acc, IoU 0 on no-target sentences); the GT-prompted oracle's is."""
    from sam4mllm.demo import baselines, score_baseline
    from sam4mllm.inference import SegmentResult
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    dataset = workspace("eval", "dataset=synthetic_gres").dataset
    m = score_baseline(dataset, lambda s: SegmentResult([np.zeros(s.size, bool)], np.array([[0.0, 0.0, 1.0, 1.0]])))
    assert m["n_no_target"] > 0 and m["N-acc"] == 0.0 and m["T-acc"] == 1.0 and m["gIoU"] == 0.0
    oracle = score_baseline(dataset, baselines(GrabCutSegmenter(), 0)["oracle: GT box -> segmenter"])
    assert oracle["N-acc"] == 1.0 and oracle["T-acc"] == 1.0


@pytest.mark.slow
@pytest.mark.learning
def test_learned_pqpp_beats_the_trivial_baselines_by_a_clear_margin(tmp_path):
    """Does training teach the tiny model anything the segmenter can use? PQPP trained from
    random init must beat both trivial baselines on val by a clear margin.

    On a benchmark a CPU can learn in minutes: one object per image, so it tests *localising*,
    not yet choosing the referred object among several (the demo's open problem, README).
    4-11 minutes, so `make test` leaves it out (CI runs the reduced test above and the
    plumbing test); `make test-learning` runs it.
    """
    learned, _, trivial = _train_and_score_pqpp(
        tmp_path, "{train:1000,val:40,testA:1,testB:1}", 3,
        ["pqpp_mode=joint", "train.max_steps=1000", "train.micro_batch_size=16"], ["eval.pqpp.mode=joint"], "val")
    assert learned >= max(trivial.values()) + 0.15  # measured: 0.910-0.921 vs centre box 0.586
