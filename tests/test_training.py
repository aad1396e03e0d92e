"""MLLM side: adapters, dialogs, loss masking, truncation, trainable parameters, trainer (multi-rank and
launcher runs: test_distributed.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoImageProcessor

from sam4mllm.codec import Point, TargetPrompt
from sam4mllm.config import build
from sam4mllm.dialogs import Dialog, point_turns, ppg_dialog, pqpp_dialog, vqa_dialog
from sam4mllm.models.adapter import IGNORE_INDEX, Adapter
from sam4mllm.shards import read_shard, write_records
from sam4mllm.training.launch import env_tools_first, strip_local_rank
from sam4mllm.training.trainer import apply_finetuning, lr_schedule, train

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen2vl", "qwen2_5vl", "qwen3vl", "llava_next"]
IMAGE = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)
TARGET = TargetPrompt((100, 150, 600, 700), (Point(200, 300, True), Point(400, 500, True), Point(120, 160, False)))


def _adapter(workspace, family: str) -> Adapter:
    return instantiate(workspace("train", f"model=tiny_{family}", "+exp=pqpp").model)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_on_assistant_tokens_only(workspace, family):
    a = _adapter(workspace, family)
    d = pqpp_dialog("the red circle", [TARGET], "res", a.fmt, "per_point")
    enc = a.encode(d, IMAGE)
    ids, labels = enc.inputs["input_ids"][0], enc.labels[0]
    supervised = a.tokenizer.decode(ids[labels != IGNORE_INDEX])
    end = a.spec.turn_end
    assert supervised == "".join(answer + end for _, answer in d.turns)
    image_ids = set(a.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<image>"])) - {a.tokenizer.unk_token_id}
    assert not any(int(t) in image_ids for t in ids[labels != IGNORE_INDEX])
    assert (labels[ids == a.yes_id] == a.yes_id).all()  # every "Yes" here is an answer


@pytest.mark.parametrize("family", FAMILIES)
def test_yes_no_single_tokens_and_joint_answers(workspace, family):
    a = _adapter(workspace, family)
    assert a.yes_id != a.no_id
    assert a.tokenizer.encode("NoYesYesNo", add_special_tokens=False) == [a.no_id, a.yes_id, a.yes_id, a.no_id]
    d = pqpp_dialog("x", [TARGET], "res", a.fmt, "joint")
    assert d.turns[1][1] == "YesYesNo"


def test_truncation_drops_whole_turns_and_counts_them(workspace):
    a = _adapter(workspace, "qwen2vl")
    d = pqpp_dialog("the red circle", [TARGET], "res", a.fmt, "per_point")
    full = a.encode(d, IMAGE).length
    a.max_length = full - 5
    enc = a.encode(d, IMAGE)
    assert enc.dropped_turns == 1 and enc.length <= a.max_length
    sup = a.tokenizer.decode(enc.inputs["input_ids"][0][enc.labels[0] != IGNORE_INDEX])
    assert sup == "".join(ans + "<|im_end|>" for _, ans in d.turns[:-1])  # no answer cut in half
    a.max_length = 10
    from sam4mllm.models.adapter import SampleTooLongError

    with pytest.raises(SampleTooLongError):
        a.encode(d, IMAGE)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every supervised token (the model's own next-token shift)."""
    keep = labels[1:] != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="none")


@pytest.mark.parametrize("family", FAMILIES)
def test_branched_questions_train_exactly_as_if_each_were_asked_alone(workspace, family):
    a = _adapter(workspace, family)
    other = TargetPrompt((500, 40, 900, 300), (Point(600, 100, True), Point(880, 290, False)))
    targets = [TARGET, other]
    first = Dialog(pqpp_dialog("the red circle", targets, "gres", a.fmt).turns[:1])
    groups = point_turns(targets, a.fmt)
    branched, plain = a.encode_branched(first, groups, IMAGE), a.encode(first, IMAGE)
    alone = [a.encode(Dialog([*first.turns, turn]), IMAGE) for group in groups for turn in group]
    assert branched.dropped_turns == 0
    assert branched.length < plain.length + sum(e.length - plain.length for e in alone)  # shared text once
    a.model.eval()
    with torch.no_grad():
        batch = a.collate([plain, branched])  # padded next to a plain dialog: both must be unaffected
        assert batch["attention_mask"].dim() == 4
        logits = a.model(**batch).logits
        got = _token_losses(logits[1, :branched.length], branched.labels[0])
        refs = [_token_losses(a.model(**a.collate([e])).logits[0], e.labels[0]) for e in alone]
        plain_ref = a.model(**a.collate([plain])).logits[0]
    np.testing.assert_allclose(logits[0, :plain.length], plain_ref, atol=1e-4)
    # the box answer once, then each question's answer and turn end, as scored alone
    want = torch.cat([refs[0][:-2], *(r[-2:] for r in refs)])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert len(got) == int((plain.labels != IGNORE_INDEX).sum()) + 2 * len(alone)
    with torch.no_grad():
        loss = a.model(**a.collate([branched])).loss  # the trainer's loss: the mean over those tokens
    np.testing.assert_allclose(float(loss), float(want.mean()), rtol=1e-4)


def test_branched_truncation_drops_whole_trailing_branches(workspace):
    a = _adapter(workspace, "qwen2vl")
    first = Dialog(pqpp_dialog("the red circle", [TARGET], "res", a.fmt).turns[:1])
    groups = point_turns([TARGET], a.fmt)
    full = a.encode_branched(first, groups, IMAGE)
    a.max_length = full.length - 1
    cut = a.encode_branched(first, groups, IMAGE)
    assert cut.dropped_turns == 1 and cut.length < full.length
    assert torch.equal(cut.inputs["input_ids"], full.inputs["input_ids"][:, :cut.length])
    assert set(cut.tree[1].tolist()) == {-1, 0, 1}
    a.max_length = 10
    from sam4mllm.models.adapter import SampleTooLongError

    with pytest.raises(SampleTooLongError):
        a.encode_branched(first, groups, IMAGE)


def test_branch_mode_trains_every_labelled_point_as_its_own_branch(workspace):
    from sam4mllm.training.data import MixtureDataset, label_examples

    cfg = workspace("train", "model=tiny_qwen2vl", "+exp=pqpp")
    examples = label_examples(cfg.data.sources.refcoco.path, "pqpp")
    data = MixtureDataset({"l": (examples, 1.0)}, instantiate(cfg.model), "pqpp", "branch")
    n_points = {(str(ex.image_path), ex.expression): sum(len(t["points"]) for t in ex.targets) for ex in examples}
    for i in range(6):
        ex = examples[data.items[i][1]]
        enc = data[i]
        branches = {tuple(b) for b in enc.tree.T.tolist() if b[1] >= 0}
        assert len(branches) == n_points[(str(ex.image_path), ex.expression)] > 1


def test_sentences_packed_into_one_dialog_train_as_their_dialogs_back_to_back_with_the_image_once(workspace):
    import dataclasses

    from sam4mllm.data.base import load_image
    from sam4mllm.training.data import MixtureDataset, build_mixture, label_examples

    cfg = workspace("train", "model=tiny_qwen2vl", "+exp=pqpp")
    single = label_examples(cfg.data.sources.refcoco.path, "pqpp")
    packed = label_examples(cfg.data.sources.refcoco.path, "pqpp", sentences_per_dialog=2)
    # The same sentences in the same order, each group about one image.
    assert [(e.image_path, e.expression) for p in packed for e in (p, *p.more)] == [
        (e.image_path, e.expression) for e in single]
    assert all(len(p.more) <= 1 and {m.image_path for m in p.more} <= {p.image_path} for p in packed)
    assert len(single) > len(packed) > len(single) / 2
    a = instantiate(cfg.model)
    one, two = (MixtureDataset({"l": (ex, 1.0)}, a, "pqpp") for ex in (single, packed))
    assert one.fingerprint() != two.fingerprint()  # a resume with other packing is refused
    ex = next(p for p in packed if p.more)
    image = load_image(ex.image_path)
    both = two.encode(ex, image)
    alone = [one.encode(e, image) for e in (dataclasses.replace(ex, more=()), *ex.more)]

    def supervised(enc):
        return a.tokenizer.decode(enc.inputs["input_ids"][0][enc.labels[0] != IGNORE_INDEX])

    def image_tokens(enc):
        return int((enc.inputs["input_ids"][0] == a.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())

    assert supervised(both) == supervised(alone[0]) + supervised(alone[1]) and both.dropped_turns == 0
    assert image_tokens(both) == image_tokens(alone[0]) > 0 and both.length < alone[0].length + alone[1].length
    torch.testing.assert_close(both.inputs["pixel_values"], alone[0].inputs["pixel_values"])
    with pytest.raises(ValueError, match="does not pack sentences"):
        build_mixture(cfg.data.sources, a, "pqpp", "branch", sentences_per_dialog=2)
    with pytest.raises(ValueError, match="sentences_per_dialog=0"):
        label_examples(cfg.data.sources.refcoco.path, "pqpp", sentences_per_dialog=0)


def test_labels_of_exif_turned_images_are_trained_on_the_image_turned(workspace, tmp_path):
    """ReasonSeg's polygons are in the frame of its images turned by their EXIF tag: its label file
    says so, and the trainer reads the image turned, where the label's box is on the object."""
    from PIL import Image

    from sam4mllm.data.base import load_image
    from sam4mllm.labels import generate_labels
    from sam4mllm.training.data import MixtureDataset, label_examples

    shown = np.zeros((60, 100, 3), np.uint8)
    shown[20:50, 10:40] = 255
    folder = tmp_path / "reason_seg/ReasonSeg/train"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(folder / "p.jpg", exif=exif, quality=95)
    (folder / "p.json").write_text(json.dumps({"text": ["the white square"], "is_sentence": False, "shapes": [
        {"label": "target", "points": [[10, 20], [39, 20], [39, 49], [10, 49]]}]}))
    merged = generate_labels(workspace("gen_labels", "+exp=pqpp", "dataset=synthetic_reasonseg", "split=train",
                                       f"dataset.root={tmp_path}", f"out_dir={tmp_path / 'labels'}", "progress=false",
                                       "overlays=0"))
    [ex] = label_examples(merged, "pqpp")
    assert ex.exif_orientation and ex.targets[0]["box"] == [10, 20, 40, 50]
    data = MixtureDataset({"l": ([ex], 1.0)}, _adapter(workspace, "qwen2vl"), "pqpp")
    trained, turned = data[0].inputs["input_ids"], load_image(folder / "p.jpg", exif_orientation=True)
    assert torch.equal(trained, data.encode(ex, turned).inputs["input_ids"])
    assert not torch.equal(trained, data.encode(ex, load_image(folder / "p.jpg")).inputs["input_ids"])
    # The other datasets' label files do not mention it (their bytes as before this option).
    assert "exif_orientation" not in read_shard(workspace.out / "labels/pqpp/synthetic/train/labels.jsonl")[0]


def test_a_dialog_too_long_to_train_is_replaced_by_the_next_that_fits(workspace, synthetic):
    from sam4mllm.training.data import Example, MixtureDataset

    a = _adapter(workspace, "qwen2vl")
    image = next((synthetic.root / "coco" / "train2014").glob("*.png"))
    target = {"box": [10.0, 10.0, 60.0, 70.0], "points": [[20, 30], [50, 40]], "labels": [1, 0]}
    texts = ["the red circle", "the " + "very " * 200 + "big square", "the blue triangle"]
    data = MixtureDataset({"s": ([Example(image, "seg", t, "res", [target]) for t in texts], 1.0)}, a, "pqpp")
    order = [texts[j] for _, j in data.items]
    lengths = {t: data[order.index(t)].length for t in texts}
    a.max_length = max(lengths[texts[0]], lengths[texts[2]])  # the others fit whole; the long one not even alone
    got = [data[i].inputs["input_ids"].tolist() for i in range(len(data))]
    long_at = order.index(texts[1])
    assert got[long_at] == got[(long_at + 1) % len(got)]  # every draw gives a full dialog: the next that fits
    assert data.stats["too_long"] == 1 and data.stats["dropped_turns"] == 0
    a.max_length = 20
    with pytest.raises(ValueError, match=r"no example can be trained on: 3 too long for model.max_length=20, 0 "):
        data[0]


def test_an_example_whose_image_is_unreadable_is_replaced_by_the_next_and_counted(workspace, synthetic, tmp_path,
                                                                                    caplog):
    from sam4mllm.data.base import load_image
    from sam4mllm.training.data import Example, MixtureDataset

    a = _adapter(workspace, "qwen2vl")
    image = next((synthetic.root / "coco" / "train2014").glob("*.png"))
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    images = [image, tmp_path / "corrupt.png", image, tmp_path / "missing.png"]
    target = {"box": [10.0, 10.0, 60.0, 70.0], "points": [[20, 30]], "labels": [1]}
    examples = [Example(p, "seg", f"the shape number {k}", "res", [target]) for k, p in enumerate(images)]
    data = MixtureDataset({"s": (examples, 1.0)}, a, "pqpp")
    order = [j for _, j in data.items]
    got = [data[i].inputs["input_ids"].tolist() for i in range(len(data))]  # a corrupt image used to crash here
    for i in range(len(order)):
        nxt = next(order[(i + k) % 4] for k in range(4) if images[order[(i + k) % 4]] == image)
        assert got[i] == data.encode(examples[nxt], load_image(image)).inputs["input_ids"].tolist()
    first_bad = next(images[j] for j in order if images[j] != image)
    assert data.stats["unreadable"] == 2 and caplog.text.count("replaced by the next draw") == 1
    assert first_bad.name in caplog.text  # logged when met, not only in the end-of-run summary
    bad = MixtureDataset({"s": ([examples[1], examples[3]], 1.0)}, a, "pqpp")
    with pytest.raises(ValueError, match=r"0 too long for model\.max_length=2048, 2 with a missing or corrupt image"):
        bad[0]


def test_dialog_shapes():
    from sam4mllm.codec import get_format

    fmt = get_format("qwen2vl")
    assert len(pqpp_dialog("x", [TARGET, TARGET], "gres", fmt).turns) == 1 + 2 * 3
    assert len(pqpp_dialog("x", [TARGET, TARGET], "gres", fmt, "joint").turns) == 3
    none = pqpp_dialog("x", [], "gres", fmt)
    assert none.turns == [(none.turns[0][0], "No object found.")] and "(0+)" in none.turns[0][0]
    assert "(1)" in ppg_dialog("x", [TARGET], "res", fmt).turns[0][0]
    assert vqa_dialog("What?", "red").turns[0][1] == "red"


def test_only_lora_and_the_projector_train(workspace):
    cfg = workspace("train", "+exp=pqpp")
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.lora.dropout) == (256, 128, 0.05)
    a = instantiate(cfg.model)
    base = sum(p.numel() for p in a.model.parameters())
    merger = sum(p.numel() for p in a.model.model.visual.merger.parameters())
    counts = apply_finetuning(a, cfg.train)
    assert counts["other"] == 0 and counts["projector"] == merger
    lm_linears = [m for n, m in a.model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj")) and "language_model" in n and hasattr(m, "lora_A")]
    expected_lora = sum(256 * (m.in_features + m.out_features) for m in lm_linears)
    assert len(lm_linears) == 2 * 7 and counts["lora"] == expected_lora
    for n, p in a.model.named_parameters():
        if p.requires_grad:
            assert ("lora_" in n and "language_model" in n) or ("merger.modules_to_save" in n), n
    frozen = sum(p.numel() for p in a.model.parameters() if not p.requires_grad)
    assert frozen >= base  # the base model (and the merger's original copy) stay frozen


def _cfg(workspace, run_dir, *extra):
    return workspace("train", "+exp=pqpp", "deepspeed=none", f"run_dir={run_dir}", "progress=false",
                     "train.micro_batch_size=2", "train.grad_accum=2", *extra)


# Golden first losses of the tiny PQPP run (seed 0, fp32, plain PyTorch). They move only
# when the model, tokenizer, data, dialogs or optimisation change: re-pin deliberately.
GOLDEN = [6.509033918380737, 6.463232040405273, 6.490004777908325]


def test_golden_first_losses(workspace, tmp_path):
    hist = train(_cfg(workspace, tmp_path / "run", "train.max_steps=3", "save_final=false"))
    assert [h["loss"] for h in hist] == pytest.approx(GOLDEN, abs=1e-4)


def test_refuses_to_overwrite_a_run(workspace, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="resume=true"):
        train(_cfg(workspace, tmp_path / "run", "train.max_steps=1"))


def test_missing_labels_name_the_job_and_a_switched_off_source_needs_none(workspace, tmp_path):
    from sam4mllm.training.data import build_mixture

    cfg = workspace("train", "model=tiny_qwen2vl", "+exp=pqpp")
    full = build_mixture(cfg.data.sources, None, "pqpp")
    missing = tmp_path / "labels" / "pqpp" / "synthetic_gres" / "train" / "labels.jsonl"
    cfg.data.sources.grefcoco.path = str(missing)
    expected = r"dataset=synthetic_gres split=train\n.*data\.sources\.grefcoco\.ratio=0"
    with pytest.raises(FileNotFoundError, match=expected):
        build_mixture(cfg.data.sources, None, "pqpp")
    cfg.data.sources.grefcoco.path = str(tmp_path / "mine.jsonl")  # not gen_labels' layout: no guessed names
    with pytest.raises(FileNotFoundError, match="dataset=<its dataset> split=<its split>"):
        build_mixture(cfg.data.sources, None, "pqpp")
    cfg.data.sources.grefcoco.ratio = 0
    off = build_mixture(cfg.data.sources, None, "pqpp")
    assert sorted(off.sources) == ["refcoco", "vqav2"] and len(full.sources) == 3
    assert {name for name, _ in off.items} == {"refcoco", "vqav2"}
    assert len(off) == len(full) - len(full.sources["grefcoco"][0])


def test_bad_training_data_or_a_resume_without_a_checkpoint_fails_before_the_model_loads(workspace, tmp_path):
    """The 7B's weights are missing too: each error must be about the data or the run, found first."""
    no_model = ["model=qwen2vl_7b", f"model.path={tmp_path / 'no_weights'}"]
    with pytest.raises(FileNotFoundError, match=r"no model folder at .*no_weights"):  # for contrast
        train(_cfg(workspace, tmp_path / "a", *no_model))
    missing = f"data.sources.refcoco.path={tmp_path / 'labels.jsonl'}"
    with pytest.raises(FileNotFoundError, match=r"label file .* \(training source 'refcoco'\) is missing"):
        train(_cfg(workspace, tmp_path / "b", *no_model, missing))
    with pytest.raises(ValueError, match=r"train\.val_every needs data\.val"):
        train(_cfg(workspace, tmp_path / "c", *no_model, "train.val_every=3", "data.val=null"))
    # The config's data.val: the synthetic val labels, which this workspace has not generated.
    with pytest.raises(FileNotFoundError, match=r"dataset=synthetic split=val\n.*~data\.val\.refcoco"):
        train(_cfg(workspace, tmp_path / "d", *no_model, "train.val_every=3"))
    with pytest.raises(FileNotFoundError, match=r"resume=true but .*e.checkpoints.latest does not exist"):
        train(_cfg(workspace, tmp_path / "e", *no_model, "resume=true"))


@pytest.mark.timeout(300)  # the bug this guards against is a run that waits forever
def test_a_run_with_nothing_to_feed_stops_with_the_reason_instead_of_waiting(workspace, tmp_path):
    off = ["data.sources.refcoco.ratio=0", "data.sources.grefcoco.ratio=0", "data.sources.vqav2.ratio=0"]
    with pytest.raises(ValueError, match=r"draws no example .*\{\}"):
        train(_cfg(workspace, tmp_path / "empty", "train.max_steps=2", *off))
    with pytest.raises(ValueError, match=r"no example can be trained on: \d+ too long for model.max_length=20"):
        train(_cfg(workspace, tmp_path / "long", "train.max_steps=2", "model.max_length=20"))


def _records(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    records = _records(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl must hold each step once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_kill_and_resume_follows_the_uninterrupted_loss_curve(workspace, tmp_path):
    common = ["train.max_steps=8", "train.save_every=2", "train.optimizer.lr=1e-3", "save_final=false"]
    full = train(_cfg(workspace, tmp_path / "full", *common))
    run = tmp_path / "killed"
    args = [sys.executable, "scripts/train.py", "+exp=pqpp", "deepspeed=none", f"run_dir={run}", "progress=false",
            "train.micro_batch_size=2", "train.grad_accum=2", *workspace.base, *common]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    r = subprocess.run([*args, "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == pytest.approx([h["loss"] for h in full], abs=1e-5)
    assert full[-1]["loss"] < full[0]["loss"]


def test_a_run_resumed_with_a_smaller_micro_batch_continues_at_the_example_where_it_stopped(workspace, tmp_path):
    """After running out of memory, a run resumes with half the micro-batch and twice the accumulation.
    With a learning rate of 1e-30 (Lion refuses 0) and no dropout, a step's loss depends only on the
    examples it trains on:
    the resumed steps must be the uninterrupted run's (counting micro-batches of the new size from
    the old count would train on examples a second time)."""
    frozen = ["train.optimizer.lr=1e-30", "train.lora.dropout=0", "save_final=false"]
    straight = train(_cfg(workspace, tmp_path / "straight", "train.max_steps=4", "train.micro_batch_size=1",
                          "train.grad_accum=4", *frozen))
    run = tmp_path / "resumed"
    train(_cfg(workspace, run, "train.max_steps=2", "train.save_every=2", *frozen))  # micro-batches of 2
    resumed = train(_cfg(workspace, run, "train.max_steps=4", "train.micro_batch_size=1", "train.grad_accum=4",
                         "resume=true", *frozen))
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight[2:]], abs=1e-6)
    assert len({round(h["loss"], 6) for h in straight}) == 4  # the steps' examples differ, and so do their losses
    # A micro-batch that does not divide the examples already trained on cannot continue there.
    with pytest.raises(ValueError, match="micro-batch"):
        train(_cfg(workspace, run, "train.max_steps=6", "train.micro_batch_size=3", "resume=true", *frozen))


def test_the_resumed_position_is_converted_between_micro_batch_sizes(workspace, tmp_path):
    from sam4mllm.training.trainer import Trainer

    t = Trainer(_cfg(workspace, tmp_path / "run", "train.micro_batch_size=3"))
    t.data = list(range(10))  # one rank, 10 examples an epoch
    assert t._resumed_micro({"micro": 3, "micro_batch_size": 2}, "step-1") == 2  # 6 examples in
    assert t._resumed_micro({"micro": 2}, "step-1") == 2  # a checkpoint from before sizes were saved
    # Saved after the epoch's last micro-batch: whatever the size (3 does not divide 10), the epoch is done.
    assert t._resumed_micro({"micro": 5, "micro_batch_size": 2}, "step-1") == 4
    assert t._resumed_micro({"micro": 3, "micro_batch_size": 4}, "step-1") == 4  # its last one shorter: 12 >= 10
    with pytest.raises(ValueError, match="divides 4"):
        t._resumed_micro({"micro": 2, "micro_batch_size": 2}, "step-1")


def test_a_resumed_run_logs_to_the_wandb_run_it_resumes(workspace, tmp_path):
    """wandb is offline by default (tests disable it elsewhere): a resume continues the same run id."""
    run = tmp_path / "run"
    common = ["logger.wandb_mode=offline", "train.save_every=1", "save_final=false"]
    train(_cfg(workspace, run, "train.max_steps=1", *common))
    train(_cfg(workspace, run, "train.max_steps=2", "resume=true", *common))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {(run / "wandb_id").read_text()}
    assert sorted(_losses(run)) == [1, 2]


def test_only_the_newest_checkpoints_are_kept_and_the_run_resumes_from_them(workspace, tmp_path):
    run = tmp_path / "run"
    common = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=2", "train.optimizer.lr=1e-3",
              "save_final=false"]
    straight = [h["loss"] for h in train(_cfg(workspace, run, *common))]
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == [
        f"step-000000{s}{x}" for s in (3, 4) for x in (".meta.json", ".pt", ".rng-rank00000.pt")]
    (ckpt / "latest").write_text("step-0000003")  # as if killed during step 4
    train(_cfg(workspace, run, *common, "resume=true"))
    assert _losses(run)[4] == pytest.approx(straight[3], abs=1e-5)


def test_pruning_keeps_the_newest_checkpoints_up_to_this_step_and_nothing_else(tmp_path):
    from types import SimpleNamespace

    from sam4mllm.training.trainer import Trainer

    names = ["latest", "zero_to_fp32.py", "step-notes.txt", *(f"step-000000{s}.meta.json" for s in range(1, 6)),
             *(f"step-000000{s}.rng-rank00001.pt" for s in range(1, 6))]
    for name in names:
        (tmp_path / name).write_text("")
    for s in range(1, 6):
        (tmp_path / f"step-000000{s}").mkdir()  # DeepSpeed's folder
        (tmp_path / f"step-000000{s}" / "mp_rank_00_model_states.pt").write_text("")
    # At step 3 of a run resumed from a rolled-back "latest": steps 4 and 5 are ahead of it, not older.
    Trainer._prune_checkpoints(SimpleNamespace(step=3, t=SimpleNamespace(keep_checkpoints=2)), tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    kept = [f"step-000000{s}{x}" for s in range(2, 6) for x in ("", ".meta.json", ".rng-rank00001.pt")]
    assert left == sorted(["latest", "zero_to_fp32.py", "step-notes.txt", *kept])


def test_a_resume_over_changed_data_is_refused_and_changed_settings_are_listed(workspace, tmp_path, caplog):
    run, common = tmp_path / "run", ["train.save_every=2", "save_final=false"]
    train(_cfg(workspace, run, "train.max_steps=2", *common))
    train(_cfg(workspace, run, "train.max_steps=3", *common, "resume=true"))  # train longer: allowed, and said
    assert "train.max_steps: 2 -> 3" in caplog.text and "resume:" not in caplog.text
    assert "max_steps: 2" in (run / "config.yaml").read_text()  # the first run's config is kept
    assert "max_steps: 3" in (run / "config.resumed-at-step-0000002.yaml").read_text()
    cfg = _cfg(workspace, run, "train.max_steps=3", *common, "resume=true")
    header, records = read_shard(Path(cfg.data.sources.refcoco.path))
    write_records(tmp_path / "regenerated.jsonl", header, records[:-1])  # one image fewer
    with pytest.raises(ValueError, match=r"source\(s\) \['refcoco'\] differ from the data step-0000002 was"):
        train(_cfg(workspace, run, "train.max_steps=3", *common, "resume=true",
                   f"data.sources.refcoco.path={tmp_path / 'regenerated.jsonl'}",
                   "model=qwen2vl_7b", f"model.path={tmp_path / 'no_weights'}"))  # refused before a model loads
    # Settings that change the trained weights' shapes (or the base) are refused too, also before a model
    # loads, and so are another optimizer, whose saved state would override it (its learning rate included),
    # and another seed, which orders the epoch's draws.
    for change in (["train.lora.r=8"], ["train.finetune=full"], ["train.optimizer.lr=2e-5"], ["train.seed=1"],
                   ["model=qwen2vl_7b", f"model.path={tmp_path / 'no_weights'}"]):
        with pytest.raises(ValueError, match=r"resuming step-0000002 with .*: its weights would not fit"):
            train(_cfg(workspace, run, "train.max_steps=3", *common, "resume=true", *change))
    # A checkpoint two ranks saved (each rank counts its place in the epoch in its own share of the draws).
    ckpt = run / "checkpoints"
    shutil.copy(ckpt / "step-0000002.rng-rank00000.pt", ckpt / "step-0000002.rng-rank00001.pt")
    with pytest.raises(ValueError, match=r"step-0000002 was saved by 2 ranks and this run has 1: resume it with 2"):
        train(_cfg(workspace, run, "train.max_steps=3", *common, "resume=true"))


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_lr_schedule_after_warmup(schedule):
    lr, warmup, total, decay = 1e-3, 2, 10, 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_schedule(opt, schedule, warmup, total, decay)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def cosine(k, start, steps):  # from 1 at ``start`` to 0 at ``start + steps``
        return 0.5 * (1 + np.cos(np.pi * max(k - start, 0) / steps))

    after = {"cosine": lambda k: cosine(k, warmup, total - warmup), "constant": lambda k: 1.0,
             "wsd": lambda k: cosine(k, total - decay, decay)}[schedule]
    want = [lr * k / warmup for k in range(warmup)] + [lr * after(k) for k in range(warmup, total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match=r"train\.schedule"):
        lr_schedule(opt, "linear", warmup, total)
    with pytest.raises(ValueError, match=r"train\.decay_ratio"):
        lr_schedule(opt, "wsd", warmup, total, total - warmup + 1)


def _val_labels(workspace, tmp_path) -> dict[str, Path]:
    """PQPP labels of the synthetic val split, RES and GRES views."""
    from sam4mllm.labels import generate_labels

    return {name: generate_labels(workspace("gen_labels", "+exp=pqpp", f"dataset={view}", "split=val", "overlays=0",
                                            "progress=false", f"out_dir={tmp_path / view}"))
            for name, view in (("refcoco", "synthetic"), ("grefcoco", "synthetic_gres"))}


def test_validation_loss_is_the_held_out_labels_per_token_loss_and_leaves_training_as_it_was(workspace, tmp_path):
    from sam4mllm.data.base import load_image
    from sam4mllm.models.merge import load_finetuned
    from sam4mllm.training.data import MixtureDataset, label_examples

    val = _val_labels(workspace, tmp_path)
    common = ["train.max_steps=4", "train.optimizer.lr=1e-3", "train.lora.dropout=0.3"]  # dropout: RNG untouched?
    plain = train(_cfg(workspace, tmp_path / "plain", *common, "save_final=false"))
    cfg = _cfg(workspace, tmp_path / "run", *common, "train.val_every=3",
               f"data.val={{refcoco:{val['refcoco']},grefcoco:{val['grefcoco']}}}")
    hist = train(cfg)
    assert [h["loss"] for h in hist] == [h["loss"] for h in plain]  # exactly: validation changes no training step
    assert [h["step"] for h in hist if "val_loss" in h] == [3, 4]  # every 3 steps, and the last
    # The final weights' loss per supervised token, each val dialog in its own forward, with dropout off.
    a = instantiate(cfg.model)
    load_finetuned(a, tmp_path / "run" / "final")
    model = a.model.eval()
    data = MixtureDataset({}, a, "pqpp")
    sums = {}
    for name, path in val.items():
        token_losses = []
        for ex in label_examples(path, "pqpp"):
            enc = data.encode(ex, load_image(ex.image_path))
            with torch.no_grad():
                token_losses.append(_token_losses(model(**a.collate([enc])).logits[0], enc.labels[0]))
        sums[name] = torch.cat(token_losses)
    last = hist[-1]
    assert last["val_skipped"] == 0
    for name, losses in sums.items():
        assert last[f"val_loss/{name}"] == pytest.approx(float(losses.mean()), abs=1e-5)
    assert last["val_loss"] == pytest.approx(float(torch.cat(list(sums.values())).mean()), abs=1e-5)
    assert last["val_loss"] < hist[2]["val_loss"] - 0.01  # it moves with training
    logged = _records(tmp_path / "run")
    assert logged[-1]["val_loss"] == last["val_loss"]
    with pytest.raises(FileNotFoundError, match=r"dataset=synthetic_gres split=val\n.*~data\.val\.grefcoco"):
        train(_cfg(workspace, tmp_path / "missing", "train.max_steps=1", "train.val_every=1",
                   f"data.val.refcoco={val['refcoco']}"))
    with pytest.raises(ValueError, match=r"train\.val_every needs data\.val"):
        train(_cfg(workspace, tmp_path / "none", "train.max_steps=1", "train.val_every=1", "~data.val"))


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_an_exported_checkpoint_is_the_final_folder_a_run_stopped_there_writes(workspace, tmp_path):
    """Under a constant rate a 4-step run's step-2 checkpoint is where a 2-step run ends: exported, it
    holds the very weights that run's final folder does, and evaluation loads it."""
    from sam4mllm.models.merge import load_finetuned
    from sam4mllm.training.trainer import export_checkpoint

    same = ["train.schedule=constant", "train.optimizer.lr=1e-3", "train.save_every=2"]
    train(_cfg(workspace, tmp_path / "four", *same, "train.max_steps=4"))
    train(_cfg(workspace, tmp_path / "two", *same, "train.max_steps=2"))
    at_2 = export_checkpoint(tmp_path / "four", "step-0000002")
    assert at_2 == tmp_path / "four" / "exported" / "step-0000002"
    latest = export_checkpoint(tmp_path / "four", out=tmp_path / "latest")
    for exported, final in ((at_2, tmp_path / "two" / "final"), (latest, tmp_path / "four" / "final")):
        got, want = _adapter_weights(exported), _adapter_weights(final)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert json.loads((exported / "sam4mllm.json").read_text()) == json.loads((final / "sam4mllm.json").read_text())
    assert not all(torch.equal(a, b) for a, b in zip(_adapter_weights(at_2).values(),
                                                     _adapter_weights(latest).values(), strict=True))
    typed = subprocess.run([sys.executable, "scripts/export_checkpoint.py", str(tmp_path / "four"), "--tag",
                            "step-0000002", "--out", str(tmp_path / "typed")], cwd=ROOT, capture_output=True, text=True)
    assert typed.returncode == 0, typed.stderr[-3000:]
    assert f"python scripts/eval.py checkpoint={tmp_path / 'typed'} " in typed.stdout
    got, want = _adapter_weights(tmp_path / "typed"), _adapter_weights(at_2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    load_finetuned(instantiate(workspace("train", "+exp=pqpp").model), at_2)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step-0000003 .*'step-0000002', 'step-0000004'"):
        export_checkpoint(tmp_path / "four", "step-0000003")


def test_final_adapter_and_merge(workspace, tmp_path, monkeypatch):
    from sam4mllm.models.merge import load_finetuned, merge_adapter

    cfg = _cfg(workspace, tmp_path / "run", "train.max_steps=2", "train.optimizer.lr=1e-2")
    train(cfg)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists()
    merged = merge_adapter(final, tmp_path / "merged")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    a = instantiate(cfg.model)
    enc = a.encode(ppg_dialog("x", [TARGET], "res", a.fmt), IMAGE)
    batch = a.collate([enc])
    peft_model = PeftModel.from_pretrained(a.model, final).eval()
    merged_model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    with torch.no_grad():
        lp, lm = peft_model(**batch).logits, merged_model(**batch).logits
    assert torch.allclose(lp, lm, atol=1e-4)
    # A folder that is not run_dir/final (the run dir itself, say) is named, with what it lacks.
    for call in (lambda: merge_adapter(tmp_path / "run", tmp_path / "m2"), lambda: load_finetuned(a, tmp_path / "run")):
        with pytest.raises(FileNotFoundError, match=r"run_dir/final\): train first"):
            call()
    # A base recorded at training that is not on this machine is named, with the flag that replaces it.
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "sam4mllm.json").write_text(json.dumps({"family": "qwen2vl", "finetune": "lora",
                                                                   "base": str(tmp_path / "no-such-base")}))
    with pytest.raises(FileNotFoundError, match=r"no base model folder at .*no-such-base.*--base <folder>"):
        merge_adapter(tmp_path / "moved", tmp_path / "m3")
    # Qwen-VL-Chat exists only as remote code: merging its run needs the user's say-so, asked before loading.
    (tmp_path / "qwenvl").mkdir()
    (tmp_path / "qwenvl" / "sam4mllm.json").write_text(json.dumps({"family": "qwenvl", "finetune": "lora",
                                                                    "base": str(a.path)}))
    with pytest.raises(ValueError, match=r"qwenvl runs remote code .* merge with --trust-remote-code"):
        merge_adapter(tmp_path / "qwenvl", tmp_path / "m3")
    # Evaluating with another image size than training is refused, not run on inputs it never saw.
    small = instantiate(workspace("train", "+exp=pqpp", "++model.max_pixels=3136").model)
    with pytest.raises(ValueError, match=r"longest_edge': 12544.*longest_edge': 3136.*model.max_pixels"):
        load_finetuned(small, final)
    # An evaluation finds it before the backbone's weights load (minutes for a 7B): here they cannot.
    from sam4mllm.evaluate import build_predictor

    with monkeypatch.context() as m:
        m.setattr(type(a.model), "from_pretrained", classmethod(lambda *_, **__: pytest.fail("weights loaded")))
        with pytest.raises(ValueError, match=r"longest_edge': 12544.*longest_edge': 3136.*model.max_pixels"):
            build_predictor(workspace("eval", "++model.max_pixels=3136", f"checkpoint={final}"))


def test_a_full_fine_tune_is_evaluated_from_its_own_folder_loaded_once(workspace, tmp_path, monkeypatch):
    """Not the base first and then the trained model over it (two models' memory at the peak)."""
    from sam4mllm.evaluate import build_predictor
    from sam4mllm.models.merge import load_finetuned

    train(_cfg(workspace, tmp_path / "run", "train.finetune=full", "train.max_steps=1", "train.warmup_ratio=0",
               "train.optimizer.lr=1e-2"))
    final = tmp_path / "run" / "final"
    base = instantiate(workspace("eval").model)
    cls, loads = type(base.model), []
    real = cls.from_pretrained
    with monkeypatch.context() as m:
        m.setattr(cls, "from_pretrained", classmethod(lambda _, path, *a, **k: loads.append(Path(path))
                                                      or real(path, *a, **k)))
        got = build_predictor(workspace("eval", f"checkpoint={final}")).adapter.model.state_dict()
    assert loads == [final]
    load_finetuned(base, final)  # the base, then the trained model: the same weights
    want = base.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    untrained = instantiate(workspace("eval").model).model.state_dict()
    assert any(not torch.equal(got[k], untrained[k]) for k in got)


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2_5vl", "qwen3vl"])
def test_max_pixels_caps_the_image_tokens_and_the_coordinates_follow(workspace, family, tmp_path):
    built = instantiate(workspace("train", f"model=tiny_{family}").model).path
    # The released folders keep min_pixels / max_pixels at the top of the image processor's
    # config, where they override a `size` passed at load: the cap must win there too.
    released = tmp_path / family
    shutil.copytree(built, released)
    cfg = json.loads((released / "processor_config.json").read_text())
    size = cfg["image_processor"].pop("size")
    cfg["image_processor"].update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (released / "processor_config.json").write_text(json.dumps(cfg))
    image = np.zeros((400, 600, 3), np.uint8)
    for folder in (built, released):
        full, small = Adapter(family, folder), Adapter(family, folder, max_pixels=3136)
        grids = [a.model_inputs(a.render(Dialog([("x", "y")])), image)["image_grid_thw"][0] for a in (full, small)]
        patch = small.processor.image_processor.patch_size
        assert int(grids[1].prod()) <= 3136 // patch**2 < int(grids[0].prod())
        if family == "qwen2_5vl":  # pixels of the resized input: the size the processor really made
            assert tuple(small.coord_system().resize((400, 600))) == (grids[1][1] * patch, grids[1][2] * patch)
    small.processor.save_pretrained(tmp_path / "run_final")  # what a run saves, and evaluation compares
    assert AutoImageProcessor.from_pretrained(tmp_path / "run_final").size == small.processor.image_processor.size
    with pytest.raises(ValueError, match="max_pixels=100 is below the processor's minimum"):
        Adapter(family, built, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels applies to"):
        build(workspace("train", "model=tiny_llava_next", "++model.max_pixels=3136").model)


def test_env_tools_come_first_on_path(monkeypatch):
    tools = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", tools, "/usr/bin"]))
    env_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/local/bin", "/usr/bin"]


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["train.py", "--local_rank=1", "+exp=pqpp"]) == ["train.py", "+exp=pqpp"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["t.py", "--local_rank", "0", "a=b"]) == ["t.py", "a=b"]


def test_auto_device_is_this_ranks_gpu_else_the_cpu(monkeypatch):
    from sam4mllm.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # as a launcher sets it for the fourth process of a node
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)


def test_model_device_cpu_trains_on_the_cpu_even_where_cuda_is_available(workspace, tmp_path, monkeypatch):
    """`model.device` says where the model trains (the demo pins it to the CPU); a trainer that
    asked CUDA instead would fail here, where CUDA only pretends to be available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hist = train(_cfg(workspace, tmp_path / "run", "train.max_steps=1", "save_final=false", "model.device=cpu"))
    assert hist[0]["loss"] == pytest.approx(GOLDEN[0], abs=1e-4)


@pytest.mark.parametrize("model", ["qwen2vl_7b", "qwen2_5vl_7b", "qwen3vl_8b", "llava_next_7b", "qwen_vl_chat"])
def test_paper_size_backbones_fail_clearly_without_their_folder(workspace, model):
    from hydra.errors import InstantiationException

    cfg = workspace("train", f"model={model}", "+exp=pqpp")
    with pytest.raises((FileNotFoundError, InstantiationException), match="save_pretrained"):
        instantiate(cfg.model)


def test_remote_code_stays_off_unless_the_user_turns_it_on(workspace, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    from sam4mllm.models.adapter import build_adapter

    with pytest.raises(ValueError, match="trust_remote_code=true"):
        build_adapter("qwenvl", str(tmp_path))


def test_qwen_vl_chat_images_go_to_a_temporary_folder_of_the_adapters_own(tmp_path, monkeypatch):
    """Its remote code reads images from paths in the text: they are not written into the model
    folder (possibly read-only, and copied by merges), each image once, only the most recent kept,
    and removed with the adapter."""
    import gc

    from PIL import Image

    from sam4mllm.models import adapter as mod

    class Loaded:  # stands in for the remote-code classes, which cannot be fetched here
        @classmethod
        def from_pretrained(cls, path, **kw):
            assert kw["trust_remote_code"] and kw["local_files_only"]
            return cls()

        def to(self, device):
            return self

    monkeypatch.setattr(mod, "auto_classes", lambda family: (Loaded, Loaded))
    a = mod.QwenVLChatAdapter.__new__(mod.QwenVLChatAdapter)
    a.family, a.path = "qwenvl", tmp_path
    a._load("float32", torch.device("cpu"), True, None)
    texts = []
    a.tokenizer = lambda text, return_tensors: texts.append(text) or {"input_ids": torch.zeros(1, 1)}
    image = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    for question in ("a", "b"):
        a.model_inputs(f"{a.IMAGE_PLACEHOLDER}{question}", image)
    paths = [Path(re.fullmatch(r"<img>(.*)</img>[ab]", t).group(1)) for t in texts]
    assert paths[0] == paths[1] and len(list(paths[0].parent.iterdir())) == 1
    assert np.array_equal(np.asarray(Image.open(paths[0])), image)
    assert list(tmp_path.iterdir()) == []  # nothing in the model folder
    # Only the most recently used images stay on disk: a long run does not pile up its image set.
    a.KEEP_IMAGES = 2
    others = [np.full((8, 9, 3), v, np.uint8) for v in (1, 2)]
    for im in (others[0], image, others[1]):  # image used again: the least recent is now others[0]
        a.model_inputs(a.IMAGE_PLACEHOLDER, im)
    last = Path(re.fullmatch(r"<img>(.*)</img>", texts[-1]).group(1))
    assert sorted(paths[0].parent.iterdir()) == sorted([paths[0], last])
    assert np.array_equal(np.asarray(Image.open(last)), others[1])
    del a
    gc.collect()
    assert not paths[0].parent.exists()


def test_a_killed_process_qwen_vl_chat_image_folder_is_removed_by_the_next_one(tmp_path):
    """A kill leaves the folder (up to KEEP_IMAGES images) behind; the next adapter on this host removes
    the folders of processes no longer running, and only those."""
    import socket

    from sam4mllm.models.adapter import IMAGE_FOLDER_PREFIX, image_folder

    host = socket.gethostname().replace("-", "_")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = {name: tmp_path / f"{IMAGE_FOLDER_PREFIX}{name}" for name in
            (f"{host}-{gone.pid}-x1", f"{host}-{os.getpid()}-x2", f"otherhost-{gone.pid}-x3")}
    for folder in left.values():
        folder.mkdir()
        (folder / "a.png").write_bytes(b"png")
    made = image_folder(tmp_path)
    assert made.is_dir() and made.name.startswith(f"{IMAGE_FOLDER_PREFIX}{host}-{os.getpid()}-")
    kept = [made.name] + [f.name for k, f in left.items() if not k.endswith("x1")]  # a live process's, another host's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_gradient_checkpointing_gives_the_same_first_loss(workspace, tmp_path):
    base = train(_cfg(workspace, tmp_path / "a", "train.max_steps=1", "save_final=false"))[0]["loss"]
    gc = train(_cfg(workspace, tmp_path / "b", "train.max_steps=1", "save_final=false",
                    "train.gradient_checkpointing=true"))[0]["loss"]
    assert gc == pytest.approx(base, abs=1e-5)


def test_save_best_keeps_the_weights_of_the_lowest_validation_loss_through_a_resume(workspace, tmp_path):
    """``run_dir/best`` holds the weights of the step with the lowest val_loss, and a run resumed from
    that step keeps them: the lowest loss so far is part of the checkpoint, so the later, worse steps
    do not replace them, unless the validation data changed. It runs a full fine-tune at a rate at
    which the loss rises after its lowest step by far more than noise: LoRA's val curve at such rates
    wandered by a few hundredths, and at torch 2.6 it fell to its last step."""
    from safetensors.torch import load_file

    from sam4mllm.training.trainer import export_checkpoint

    header, *records = _val_labels(workspace, tmp_path)["refcoco"].read_text().splitlines()
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join([header, *records[:6]]) + "\n")
    common = ["train.finetune=full", "train.max_steps=4", "train.optimizer.lr=3e-2", "train.schedule=constant",
              "train.warmup_ratio=0", "train.val_every=1", f"data.val.refcoco={val}", "~data.val.grefcoco",
              "train.save_every=1", "train.save_best=true"]
    hist = train(_cfg(workspace, tmp_path / "run", *common))
    val_losses = [h["val_loss"] for h in hist]
    best = 1 + int(np.argmin(val_losses))
    assert best < len(hist), f"the test needs a val loss that rises after its lowest point: {val_losses}"
    tag = f"step-{best:07d}"

    def assert_best_is_the_exported_step() -> None:
        got, want = (load_file(tmp_path / "run" / "best" / "model.safetensors"),
                     load_file(export_checkpoint(tmp_path / "run", tag, tmp_path / tag) / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert json.loads((tmp_path / "run" / "best" / "sam4mllm.json").read_text())["step"] == best

    assert_best_is_the_exported_step()
    (tmp_path / "run" / "checkpoints" / "latest").write_text(tag)
    again = train(_cfg(workspace, tmp_path / "run", *common, "resume=true"))
    assert [h["val_loss"] for h in again] == pytest.approx(val_losses[best:], abs=1e-5)  # the same, worse steps
    assert_best_is_the_exported_step()
    # Other validation data (the same dialogs twice: the same losses, other data): a lowest loss measured
    # on the old data says nothing about them, so the first validation after the resume replaces best.
    (tmp_path / "run" / "checkpoints" / "latest").write_text(tag)
    val.write_text("\n".join([header, *records[:6], *records[:6]]) + "\n")
    again = train(_cfg(workspace, tmp_path / "run", *common, "resume=true"))
    assert [h["val_loss"] for h in again] == pytest.approx(val_losses[best:], abs=1e-5)
    assert json.loads((tmp_path / "run" / "best" / "sam4mllm.json").read_text())["step"] == best + 1
    with pytest.raises(ValueError, match=r"train\.save_best .* needs train\.val_every"):
        train(_cfg(workspace, tmp_path / "none", "train.max_steps=1", "train.save_best=true"))
