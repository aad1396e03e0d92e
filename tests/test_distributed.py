"""Training on more than one rank, or through the ``deepspeed`` launcher: ZeRO-2 and ZeRO-3 on CPU
ranks against one process, their checkpoints, resumes and exported weights (the slowest tests:
each launch starts two processes).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from test_training import FAMILIES, ROOT, _adapter_weights, _cfg, _losses, _records, _val_labels

from sam4mllm.dialogs import Dialog, pqpp_dialog
from sam4mllm.training.trainer import train

_OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # a one-process ZeRO checkpoint's optimizer file


class _RunsOnLoad:
    """Pickles as a call, ``open(path, "w")``, which any load that is not weights_only makes."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def _launch(n_ranks: int, *args: str) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus <n_ranks> <args>`` from the checkout, on a free port, wandb off."""
    from sam4mllm.training.launch import free_port

    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()),
                "--num_gpus", str(n_ranks)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _deepspeed(workspace, run_dir, n_ranks: int, *extra: str) -> subprocess.CompletedProcess:
    return _launch(n_ranks, "scripts/train.py", "+exp=pqpp", *workspace.base, f"run_dir={run_dir}",
                   "progress=false", *extra)


def _held(r: subprocess.CompletedProcess) -> list[tuple[int, int]]:
    """Each rank's logged (parameters it holds, the backbone's) after ZeRO-3 loading."""
    return [(int(a), int(b)) for a, b in re.findall(r"rank holds (\d+) of the backbone's (\d+)", r.stdout + r.stderr)]


def test_two_rank_zero2_cpu_run_through_the_deepspeed_launcher(workspace, tmp_path):
    """`deepspeed scripts/train.py +exp=pqpp` as typed, plus overrides that keep it short and
    `--num_gpus 2` (on a CPU the launcher counts NUMA nodes, often one). Two ranks of one
    example each follow one process that accumulates the same two examples per step."""
    val = _val_labels(workspace, tmp_path)
    same = ["train.max_steps=6", "train.micro_batch_size=1", "train.optimizer.lr=1e-3", "train.lora.dropout=0",
            "train.val_every=3", f"data.val={{refcoco:{val['refcoco']},grefcoco:{val['grefcoco']}}}"]
    r = _deepspeed(workspace, tmp_path / "ds", 2, *same, "train.grad_accum=1", "train.save_every=3",
                   "train.keep_checkpoints=1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    assert "dist_world_size=2" in out
    assert "--local_rank=1" in out  # the launcher appends it; Hydra would reject it unstripped
    losses = _losses(tmp_path / "ds")
    one = train(_cfg(workspace, tmp_path / "one", *same, "train.grad_accum=2", "save_final=false"))
    assert [losses[s] for s in range(1, 7)] == pytest.approx([h["loss"] for h in one], abs=1e-5)
    assert losses[6] < losses[1]
    # The val examples dealt over the two ranks, the sums all-reduced: one process's validation losses.
    logged = {r["step"]: r for r in _records(tmp_path / "ds")}
    for h in one[2::3]:
        assert {k: v for k, v in logged[h["step"]].items() if k.startswith("val_")} == pytest.approx(
            {k: v for k, v in h.items() if k.startswith("val_")}, abs=1e-5)
    cfg = (tmp_path / "ds" / "config.yaml").read_text()
    assert "stage: 2" in cfg
    # DeepSpeed's CPU all-reduce buffers (~70 MB of RAM each) must not outlive the run.
    port = r.args[r.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    ckpt = tmp_path / "ds" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-0000006"
    # Step 3's checkpoint (DeepSpeed's folder, the meta and both ranks' RNG files) made way for step 6's.
    assert sorted(p.name for p in ckpt.glob("step-*")) == [
        "step-0000006", "step-0000006.meta.json", "step-0000006.rng-rank00000.pt", "step-0000006.rng-rank00001.pt"]
    # Without DeepSpeed it has no file to read (step-0000006.pt): refused, before the model loads.
    with pytest.raises(ValueError, match=r"deepspeed\.enabled: True -> False, deepspeed\.zero_optimization\.stage: "
                                         r"2 -> <unset>: .*another DeepSpeed setting"):
        train(workspace("train", "+exp=pqpp", f"run_dir={tmp_path / 'ds'}", "progress=false", *same,
                        "train.grad_accum=1", "train.save_every=3", "train.keep_checkpoints=1", "deepspeed=none",
                        "resume=true"))
    # Nor under ZeRO-3, whose folders lay the weights out in per-rank shards: refused before the model loads.
    r = _deepspeed(workspace, tmp_path / "ds", 1, *same, "train.grad_accum=1", "train.save_every=3",
                   "train.keep_checkpoints=1", "deepspeed=zero3", "resume=true")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and re.search(r"ValueError: resuming step-0000006 with deepspeed\.zero_optimization\."
                                           r"stage: 2 -> 3: .*another DeepSpeed setting", out), out[-3000:]
    assert not _held(r)  # ZeRO-3 loading logs what each rank holds


def test_two_rank_resume_with_dialogs_too_long_to_train_follows_the_straight_run(workspace, tmp_path):
    """Too-long draws are replaced, so both ranks stay at one place in the epoch: the place a
    checkpoint stores for all of them (skipping them instead, the resumed curve left this one);
    and each rank's RNG comes back (with rank 0's for all, LoRA dropout left it too)."""
    from sam4mllm.data.base import load_image
    from sam4mllm.training.data import build_mixture

    cfg = workspace("train", "+exp=pqpp", "data.sources.vqav2.ratio=0")
    a = instantiate(cfg.model)
    data = build_mixture(cfg.data.sources, a, "pqpp")
    first = []
    for name, j in data.items[:40]:
        ex = data.sources[name][0][j]
        image = load_image(ex.image_path)
        turns = pqpp_dialog(ex.expression, a.to_model_targets(ex.targets, image.shape[:2]), ex.task, a.fmt).turns
        first.append(a.encode(Dialog(turns[:1]), image).length)
    cut = int(np.median(first))
    assert min(first) <= cut < max(first)  # some draws fit, some do not
    common = [f"model.max_length={cut}", "data.sources.vqav2.ratio=0", "train.max_steps=6", "train.save_every=3",
              "train.micro_batch_size=1", "train.grad_accum=1", "train.optimizer.lr=1e-3", "train.lora.dropout=0.3",
              "save_final=false"]  # dropout: each rank's RNG must come back as it was
    r = _deepspeed(workspace, tmp_path / "run", 2, *common)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "'too_long': 0" not in r.stdout + r.stderr
    straight = _losses(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000003")
    r = _deepspeed(workspace, tmp_path / "run", 2, *common, "resume=true")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    resumed = _losses(tmp_path / "run")
    assert [resumed[s] for s in range(4, 7)] == pytest.approx([straight[s] for s in range(4, 7)], abs=1e-6)


def test_deepspeed_checkpoint_resume_follows_the_same_curve(workspace, tmp_path):
    """ZeRO-2 (the default, one process, no launcher needed): stop after a checkpoint, resume,
    compare with a straight run."""
    common = ["+exp=ppg", *workspace.base, "progress=false", "train.micro_batch_size=2", "train.grad_accum=2",
              "train.max_steps=6", "train.save_every=3", "train.optimizer.lr=1e-3"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = lambda *a: subprocess.run([sys.executable, "scripts/train.py", *common, *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True)
    r = run(f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage: 2" in (tmp_path / "run" / "config.yaml").read_text()
    straight = _losses(tmp_path / "run")
    # Exported through DeepSpeed's reader of its fp32 master weights: the weights the run ended with (the
    # tiny model trains in fp32; under fp16 the final folder would hold the module's rounded copies).
    from sam4mllm.training.trainer import export_checkpoint

    got, want = (_adapter_weights(export_checkpoint(tmp_path / "run")), _adapter_weights(tmp_path / "run" / "final"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # Roll the finished run back to its step-3 checkpoint, as if it had died right after it.
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "latest").write_text("step-0000003")
    r = run(f"run_dir={tmp_path / 'run'}", "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(4, 7)] == pytest.approx([straight[s] for s in range(4, 7)], abs=1e-5)
    (ckpt / "latest").write_text("step-0000003")  # as if saved by a rank that this run does not have
    (ckpt / "step-0000003.rng-rank00000.pt").unlink()
    r = run(f"run_dir={tmp_path / 'run'}", "resume=true")
    assert r.returncode != 0 and "resume step-0000003 with as many ranks as saved it" in r.stderr
    # DeepSpeed's readers (resume, export) load under weights_only: a tampered file's code does not run.
    marker = tmp_path / "ran"
    (ckpt / "latest").write_text("step-0000006")
    torch.save({"optimizer_state_dict": _RunsOnLoad(marker)}, ckpt / "step-0000006" / _OPTIM)
    refused = f"Unsupported global: GLOBAL {open.__module__}.open"  # io.open up to Python 3.11, _io.open after
    with pytest.raises(pickle.UnpicklingError, match=re.escape(refused)):
        export_checkpoint(tmp_path / "run")
    r = run(f"run_dir={tmp_path / 'run'}", "resume=true", "train.max_steps=7")
    assert r.returncode != 0 and refused in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


def test_two_rank_zero3_follows_one_process_and_its_final_folder_holds_whole_weights(workspace, tmp_path):
    """ZeRO-3 shards every weight over the ranks (the persistence threshold at 0: by default DeepSpeed
    keeps weights under 1e5 elements whole, which are all of the tiny model's but none of a 7B's LoRA),
    with gradient checkpointing, as the README advises for 24 GB cards. Each rank loads only its
    shards of the backbone; both steps' losses and the validation loss after them are one process's
    (so the weights loaded are the folder's and the gradients are whole); the final folder holds the
    weights the run ended with (its fp32 masters, exported), not empty shards; resumed from its step-1
    checkpoint, the run repeats step 2 and its validation; validation's odd number
    of dialogs leaves rank 1 a forward that is not counted, without which the ranks would hang."""
    from sam4mllm.training.trainer import export_checkpoint

    header, *records = _val_labels(workspace, tmp_path)["refcoco"].read_text().splitlines()
    sentences = np.cumsum([len(json.loads(r)["samples"]) for r in records])
    keep = int(np.flatnonzero(sentences % 2 == 1)[0]) + 1  # the first records that hold an odd number
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join([header, *records[:keep]]) + "\n")
    same = ["train.max_steps=2", "train.micro_batch_size=1", "train.optimizer.lr=1e-3", "train.lora.dropout=0",
            "train.val_every=2", f"data.val.refcoco={val}", "~data.val.grefcoco"]
    one = train(_cfg(workspace, tmp_path / "one", *same, "train.grad_accum=2", "save_final=false"))
    z3 = [*same, "train.grad_accum=1", "deepspeed=zero3", "train.gradient_checkpointing=true", "train.save_every=1",
          "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    r = _deepspeed(workspace, tmp_path / "z3", 2, *z3)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "stage: 3" in (tmp_path / "z3" / "config.yaml").read_text()
    held = _held(r)
    assert len(held) == 2 and all(a < b for a, b in held), held  # loaded into shards (zero.Init), not whole
    logged = _records(tmp_path / "z3")
    assert [x["loss"] for x in logged] == pytest.approx([h["loss"] for h in one], abs=1e-4)
    assert logged[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=1e-4)
    got, want = _adapter_weights(tmp_path / "z3" / "final"), _adapter_weights(export_checkpoint(tmp_path / "z3"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # Rolled back to step 1, as if killed after it: the resumed step 2 and its validation are the straight run's.
    (tmp_path / "z3" / "checkpoints" / "latest").write_text("step-0000001")
    r = _deepspeed(workspace, tmp_path / "z3", 2, *z3, "resume=true")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    resumed = _records(tmp_path / "z3")
    assert [x["step"] for x in resumed] == [1, 2]
    assert [x["loss"] for x in resumed] == pytest.approx([x["loss"] for x in logged], abs=1e-6)
    assert resumed[-1]["val_loss"] == pytest.approx(logged[-1]["val_loss"], abs=1e-6)


_ZERO3_LOAD = """
import logging
import sys

import deepspeed
import torch
from omegaconf import OmegaConf

from sam4mllm.config import build
from sam4mllm.training.distributed import init_distributed
from sam4mllm.training.trainer import Trainer

out, *cfgs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
logging.basicConfig(level=logging.INFO)
init_distributed(True, torch.device("cpu"))
for path in cfgs:
    trainer = Trainer(OmegaConf.load(path))
    with trainer._zero3_loading():
        trainer.adapter = build(trainer.cfg.model)
    model = trainer.adapter.model
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if torch.distributed.get_rank() == 0:
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/{trainer.cfg.model.family}.pt")
torch.distributed.barrier()
"""


def test_every_tiny_family_loads_into_zero3_shards_with_the_weights_of_a_plain_load(workspace, tmp_path):
    """The trainer's ZeRO-3 loading (zero.Init; the folders in the released checkpoints' key layout)
    gives each family's backbone, gathered from its 2 ranks' shards, exactly the weights loaded whole."""
    from omegaconf import OmegaConf

    cfgs, want = [], {}
    for family in FAMILIES:
        cfg = workspace("train", "+exp=pqpp", f"model=tiny_{family}", "deepspeed=zero3", f"run_dir={tmp_path / family}")
        want[family] = instantiate(cfg.model).model.state_dict()  # plain; builds the folder first
        cfgs.append(tmp_path / f"{family}.yaml")
        OmegaConf.save(cfg, cfgs[-1], resolve=True)
    script = tmp_path / "zero3_load.py"
    script.write_text(_ZERO3_LOAD)
    r = _launch(2, str(script), str(tmp_path), *map(str, cfgs))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    held = _held(r)
    assert len(held) == 2 * len(FAMILIES) and all(a < b for a, b in held), held
    for family in FAMILIES:
        got = torch.load(tmp_path / f"{family}.pt", weights_only=True)
        assert got.keys() == want[family].keys(), family
        assert all(torch.equal(got[k], want[family][k]) for k in got), family


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_full_finetune_of_a_model_with_tied_embeddings_exports_as_its_final_folder(workspace, tmp_path,
                                                                                               stage):
    """The tiny Qwen2-VL ties lm_head to the embeddings; DeepSpeed's reader lists the weight under both
    names, the model once. Exported, the checkpoint holds the final folder's weights bit for bit, under
    the same names. ZeRO-3 runs on 2 ranks with every weight sharded and the backbone loaded into
    shards: transformers' loader for it once left save_pretrained renaming keys to "model.model.*"."""
    from safetensors.torch import load_file

    from sam4mllm.training.trainer import export_checkpoint

    a = instantiate(workspace("train", "+exp=pqpp").model)
    names = {n for n, _ in a.model.named_parameters(remove_duplicate=False)}
    assert "lm_head.weight" in names - {n for n, _ in a.model.named_parameters()}  # tied: the test's premise
    common = ["train.finetune=full", "train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum=1",
              "train.optimizer.lr=1e-3"]
    if stage == 2:
        args = [sys.executable, "scripts/train.py", "+exp=pqpp", *workspace.base, "progress=false",
                f"run_dir={tmp_path / 'run'}", *common]
        r = subprocess.run(args, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                           text=True)
    else:
        r = _deepspeed(workspace, tmp_path / "run", 2, *common, "deepspeed=zero3",
                       "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"stage: {stage}" in (tmp_path / "run" / "config.yaml").read_text()
    assert f"'other': {sum(p.numel() for p in a.model.parameters())}}}" in r.stdout + r.stderr  # all trainable
    got = load_file(export_checkpoint(tmp_path / "run") / "model.safetensors")
    want = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
