"""Predictor (PPG / PQPP / box-only), fast shared-prefix PQPP, and the evaluator."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from sam4mllm.codec import Point, TargetPrompt
from sam4mllm.data import CorruptImageError, MalformedSampleError, build_dataset
from sam4mllm.data.base import Sample
from sam4mllm.data.masks import decode_segmentation, encode_rle
from sam4mllm.dialogs import Dialog, box_question, point_question
from sam4mllm.evaluate import evaluate, rescore, write_overlays
from sam4mllm.inference import PQPPConfig, Prefix, Sam4MLLM, SegmentResult, sample_points
from sam4mllm.sam.grabcut import GrabCutSegmenter
from sam4mllm.shards import read_shard, shard_path, write_records
from sam4mllm.viz import overlay

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2_5vl", "qwen3vl", "llava_next"])
def test_fast_pqpp_equals_one_forward_per_point(workspace, family):
    adapter = instantiate(workspace("train", f"model=tiny_{family}", "+exp=pqpp").model)
    m = Sam4MLLM(adapter, GrabCutSegmenter())
    rng = np.random.default_rng(1)
    pts = rng.integers(0, 999, (25, 2))
    qs = [point_question(adapter.fmt, (10, 20, 500, 600), Point(int(x), int(y))) for x, y in pts]
    given = Dialog([(box_question("the red circle", "res"), adapter.fmt.encode([TargetPrompt((10, 20, 500, 600))]))])
    _, generated = m.generate(box_question("the blue square", "res"), IMAGE, keep_cache=True)
    for prefix in (m.prefix_from_dialog(given, IMAGE), generated):
        shared, conts = m._continuations(prefix, qs, len(prefix.ids))
        # the box's question text is encoded once; what is left per question is the point (and template)
        assert len(shared) > max(map(len, conts)) and len({len(c) for c in conts}) <= 3
        fy, fn = m.score_points(prefix, qs, fast=True)
        again = m.score_points(prefix, qs, fast=True)  # the prefix cache must survive a scoring pass
        np.testing.assert_array_equal(again[0], fy)
        sy, sn = m.score_points(prefix, qs, fast=False)
        np.testing.assert_allclose(fy, sy, atol=1e-4)
        np.testing.assert_allclose(fn, sn, atol=1e-4)
        assert np.all(fy + fn <= 1 + 1e-6) and fy.std() > 0  # real, point-dependent probabilities


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2_5vl", "qwen3vl", "llava_next"])
def test_a_batch_of_sentences_answers_as_each_asked_alone(workspace, family):
    """Round 1 generated as one left-padded batch (images of other sizes, questions of other
    lengths) gives each sentence the answer, and the points round the probabilities, it gets alone."""
    # Wider weights than the test models' (whose greedy answer is one token repeated for any
    # input on two families), so that a padding mistake would change answers, not one string.
    cfg = workspace("train", f"model=tiny_{family}", "+exp=pqpp", "++model.tiny.init_std=0.2",
                    f"model.path={workspace.out}/tiny_models/{family}_std0.2")
    adapter = instantiate(cfg.model)
    m = Sam4MLLM(adapter, GrabCutSegmenter(), max_new_tokens=12)
    rng = np.random.default_rng(2)
    images = [IMAGE, (rng.random((84, 168, 3)) * 255).astype(np.uint8), IMAGE[:56]]
    questions = [box_question(e, "res") for e in ("the blue square", "the small red circle left of the tree", "it")]
    alone = [m.generate(q, im, keep_cache=True) for q, im in zip(questions, images, strict=True)]
    batch = m.generate_many(questions, images, keep_cache=True)
    assert len({len(p.inputs["input_ids"][0]) for _, p in alone}) > 1  # the batch was padded
    unscored = m.generate_many(questions, images)  # prompt ids cut from the batch, not processed again
    assert [(t, p.ids, p.truncated) for t, p in unscored] == [(t, p.ids, p.truncated) for t, p in alone]
    pts = rng.integers(0, 999, (6, 2))
    qs = [point_question(adapter.fmt, (10, 20, 500, 600), Point(int(x), int(y))) for x, y in pts]
    for (text, prefix), (b_text, b_prefix) in zip(alone, batch, strict=True):
        assert (b_text, b_prefix.ids, b_prefix.truncated) == (text, prefix.ids, prefix.truncated)
        # Its row of the batch's cache, padding and later tokens cut off, as if it had been encoded alone
        # (keys carry their rotary positions); an answer cut at max_new_tokens lacks its last token.
        n = b_prefix.cache.get_seq_length()
        assert n == len(prefix.ids) - prefix.truncated
        alone_cache = m.fill_cache(Prefix(prefix.inputs, prefix.ids)).cache
        for b, a in zip(b_prefix.cache.layers, alone_cache.layers, strict=True):
            torch.testing.assert_close(b.keys, a.keys[:, :, :n], atol=1e-4, rtol=0)
            torch.testing.assert_close(b.values, a.values[:, :, :n], atol=1e-4, rtol=0)
        np.testing.assert_allclose(m.score_points(b_prefix, qs), m.score_points(prefix, qs), atol=1e-4)
    assert len({t for t, _ in alone}) > 1  # answers that depend on the sentence, not one string


def test_a_row_of_a_batch_cache_is_kept_only_while_it_holds_every_position():
    """A sliding-window layer that has dropped positions cannot give a row's prefix: the points round
    then encodes the prefix itself (fill_cache)."""
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from sam4mllm.inference import _row_cache

    def cache(n):
        c = DynamicCache()
        c.layers = [DynamicSlidingWindowLayer(sliding_window=5)]
        c.layers[0].update(*(torch.arange(2 * n * 2.0).reshape(2, 1, n, 2),) * 2)
        return c

    assert _row_cache(cache(6), 1, 0, 6) is None  # 6 positions through a window of 5: some are gone
    row = _row_cache(cache(4), 1, 1, 3).layers[0]
    assert row.keys.tolist() == [[[[10.0, 11.0], [12.0, 13.0]]]] and row.get_seq_length() == 2


def test_sample_points_grid_random_and_fixed():
    box = np.array([10.0, 20.0, 60.0, 70.0])
    grid = sample_points(box, (100, 100), PQPPConfig(grid=5), np.random.default_rng(0))
    assert grid.shape == (25, 2) and sorted(set(grid[:, 0].tolist())) == [15, 25, 35, 45, 55]
    rnd = sample_points(box, (100, 100), PQPPConfig(sampling="random", n_random=36), np.random.default_rng(0))
    assert rnd.shape == (36, 2) and (rnd >= [10, 20]).all() and (rnd < [60, 70]).all()
    # The reference code's points: percentages of the box, the same in every box whatever the seed.
    fixed = [sample_points(box, (100, 100), PQPPConfig(sampling="fixed", n_random=15), np.random.default_rng(s))
             for s in (0, 1)]
    assert fixed[0].shape == (15, 2) and (fixed[0] == fixed[1]).all()
    assert fixed[0][:3].tolist() == [[56, 55], [35, 64], [55, 65]]  # (93, 70), (51, 89), (91, 90) % of 50 x 50
    for n, error in ((31, "30 points"), (3, "unknown point sampling 'spiral'")):
        with pytest.raises(ValueError, match=error):
            sample_points(box, (100, 100), PQPPConfig(sampling="fixed" if n == 31 else "spiral", n_random=n),
                          np.random.default_rng(0))


class Scripted(Sam4MLLM):
    """The real pipeline around a model whose answers are scripted (text and Yes-probabilities)."""

    def __init__(self, adapter, variant, text, p_yes=None, **kw):
        super().__init__(adapter, GrabCutSegmenter(), variant, **kw)
        self.text, self.p_yes, self.asked = text, p_yes, []

    def generate(self, question, image, keep_cache=False):
        from sam4mllm.inference import Prefix

        return self.text, Prefix({"input_ids": np.zeros((1, 1))}, [0])

    def score_points(self, prefix, questions, fast=True):
        self.asked.append(questions)
        p = np.asarray(self.p_yes(len(questions)))
        return p, 1 - p


def _flat_image():
    img = np.full((100, 100, 3), 220, np.uint8)
    img[20:60, 30:80] = (200, 30, 30)
    return img


@pytest.fixture(scope="module")
def adapter(workspace):
    return instantiate(workspace("train", "+exp=pqpp").model)


def test_ppg_parses_box_and_points_into_pixels_and_segments(adapter):
    m = Scripted(adapter, "ppg", "<|box_start|>(280,180),(820,620)<|box_end|> (500,400,1) (600,300,1) (290,190,0)")
    r = m.segment(_flat_image(), "the red rectangle")
    assert r.valid and len(r.masks) == 1
    np.testing.assert_allclose(r.boxes[0], [28, 18, 82, 62])
    np.testing.assert_allclose(r.points[0], [[50, 40], [60, 30], [29, 19]])
    assert r.labels[0].tolist() == [1, 1, 0]
    gt = np.zeros((100, 100), bool)
    gt[20:60, 30:80] = True
    assert (r.masks[0] & gt).sum() / (r.masks[0] | gt).sum() > 0.9


def test_pqpp_keeps_confident_points_and_falls_back_to_the_box(adapter):
    text = "<|box_start|>(280,180),(820,620)<|box_end|>"
    conf = Scripted(adapter, "pqpp", text, p_yes=lambda n: np.linspace(0, 1, n))
    r = conf.segment(_flat_image(), "the red rectangle")
    assert len(conf.asked[0]) == 25 and r.valid
    kept = np.linspace(0, 1, 25)
    kept = kept[(kept > 0.9) | (kept < 0.1)]
    assert len(r.points[0]) == len(kept) and sorted(r.labels[0].tolist()) == sorted((kept > 0.5).astype(int).tolist())
    unsure = Scripted(adapter, "pqpp", text, p_yes=lambda n: np.full(n, 0.6))
    r2 = unsure.segment(_flat_image(), "the red rectangle")
    assert len(r2.points[0]) == 0 and len(r2.masks) == 1  # no point survives: the box alone


def test_an_answer_that_reaches_the_token_budget_is_flagged(adapter, monkeypatch):
    m = Sam4MLLM(adapter, GrabCutSegmenter(), "ppg", max_new_tokens=4, min_new_tokens=4)
    assert m.generate(box_question("x", "res"), IMAGE)[1].truncated  # made to reach the budget without its end
    assert m.segment(IMAGE, "x").truncated
    real = m.model.generate

    def ends_at_the_budget(**kw):
        out = real(**kw)
        out.sequences[0, -1] = adapter.end_id  # the 4th new token ends the answer: nothing was cut
        return out

    monkeypatch.setattr(m.model, "generate", ends_at_the_budget)
    assert not m.generate(box_question("x", "res"), IMAGE)[1].truncated and not m.segment(IMAGE, "x").truncated


def test_an_answer_holding_an_image_token_is_counted_invalid_not_a_crash(adapter):
    """The points round reads round 1's answer back with the image (in every mode but the fast one
    over generate's own cache), which takes a stray image-placeholder token for one of the image's."""
    from sam4mllm.inference import Prefix

    class Answers(Sam4MLLM):
        text = ""

        def generate(self, question, image, keep_cache=False):
            inputs = self._encode(Dialog([(question, "")]), image, open_last=True)
            new = self.adapter.tokenizer.encode(self.text, add_special_tokens=False)
            return self.text, Prefix(inputs, inputs["input_ids"][0].tolist() + new)

    box = "<|box_start|>(280,180),(820,620)<|box_end|>"
    for pqpp in (PQPPConfig(fast=False), PQPPConfig(mode="joint"), PQPPConfig()):
        m = Answers(adapter, GrabCutSegmenter(), "pqpp", pqpp)
        m.text = "<|image_pad|>" + box
        r = m.segment(_flat_image(), "the red rectangle")
        assert not r.valid and r.reason == "an image placeholder token in the answer" and not r.masks
        m.text = box
        assert m.segment(_flat_image(), "the red rectangle").valid


def test_invalid_and_no_target_answers(adapter):
    bad = Scripted(adapter, "pqpp", "I think it is the red one")
    r = bad.segment(_flat_image(), "x")
    assert not r.valid and r.reason == "no box found" and r.union((100, 100)) is None
    none = Scripted(adapter, "pqpp", "No object found.")
    r = none.segment(_flat_image(), "x", task="gres")
    assert r.valid and r.no_target and not r.masks and none.asked == []


class Oracle:
    """Answers with the ground truth, or garbage for the samples whose expression length is a multiple of k."""

    def __init__(self, garbage_every: int = 0):
        self.garbage_every = garbage_every

    def segment(self, image, expression, task="res"):
        if self.garbage_every and len(expression) % self.garbage_every == 0:
            return SegmentResult([], np.zeros((0, 4)), text="???", valid=False, reason="no box found")
        return SegmentResult(list(self.current.masks), self.current.boxes, text="gt", timings={"total": 0.0},
                             no_target=not self.current.masks)


def _eval_cfg(workspace, out, *extra):
    return workspace("eval", f"out_dir={out}", "progress=false", "checkpoint=null", *extra)


def _run(cfg, oracle, fits: int | None = None, asked: list[int] | None = None):
    """Evaluate ``cfg`` with ``oracle`` answering; a batch of more than ``fits`` sentences raises
    CUDA's out-of-memory error; ``asked`` collects the batch sizes the evaluator asked for."""
    ds = build_dataset(cfg.dataset, cfg.split)

    def readable():
        for i in range(len(ds)):
            try:
                yield ds[i]
            except (CorruptImageError, MalformedSampleError):
                continue

    class Feed:
        def segment_many(self, items):
            if asked is not None:
                asked.append(len(items))
            if fits is not None and len(items) > fits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)")
            return [self._one(image, expression, task) for image, expression, task in items]

        def _one(self, image, expression, task):
            oracle.current = next(s for s in readable()
                                  if s.expression == expression and np.array_equal(s.image, image))
            return oracle.segment(image, expression, task)

    return evaluate(cfg, Feed())


def test_evaluator_scores_oracle_perfectly_and_counts_invalid(workspace, tmp_path):
    m = _run(_eval_cfg(workspace, tmp_path / "a", "dataset=synthetic_gres"), Oracle())
    assert m["cIoU"] == 1.0 and m["gIoU"] == 1.0 and m["N-acc"] == 1.0 and m["invalid_rate"] == 0.0
    m2 = _run(_eval_cfg(workspace, tmp_path / "b", "dataset=synthetic_gres", "eval.batch_size=3"),
              Oracle(garbage_every=4))
    ds = build_dataset(_eval_cfg(workspace, tmp_path / "b", "dataset=synthetic_gres").dataset, "val")
    n_bad = sum(len(r["expression"]) % 4 == 0 for r in ds.records)
    assert n_bad > 0 and m2["invalid_rate"] == pytest.approx(n_bad / m2["n"]) and m2["gIoU"] < 1.0
    # An unparseable answer on a no-target sentence is not a "no target" prediction (GRES official code).
    empty = [r for r in ds.records if not r["ann_ids"]]
    bad_empty = sum(len(r["expression"]) % 4 == 0 for r in empty)
    assert bad_empty > 0 and m2["N-acc"] == pytest.approx(1 - bad_empty / len(empty))
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == m2
    assert m2 == rescore(tmp_path / "b" / "predictions.jsonl", _eval_cfg(workspace, tmp_path / "b",
                                                                          "dataset=synthetic_gres").dataset)
    assert len(list((tmp_path / "a" / "overlays").glob("*.png"))) == 8


def test_evaluation_in_batches_writes_what_one_sentence_at_a_time_writes(workspace, tmp_path):
    model = ("++model.tiny.init_std=0.2", f"model.path={workspace.out}/tiny_models/qwen2vl_std0.2",
             "eval.max_new_tokens=8", "eval.overlays=0")
    records = {}
    for b in (1, 4):
        evaluate(_eval_cfg(workspace, tmp_path / str(b), f"eval.batch_size={b}", *model))
        _, rows = read_shard(tmp_path / str(b) / "predictions.jsonl")
        records[b] = [{k: v for k, v in r.items() if k != "timings"} for r in rows]
    assert len(records[1]) % 4 and records[4] == records[1]  # a last, shorter batch too
    assert len({r["text"] for r in records[1]}) > len(records[1]) // 2  # answers of their own
    with pytest.raises(ValueError, match=r"eval\.batch_size=0"):
        evaluate(_eval_cfg(workspace, tmp_path / "0", "eval.batch_size=0", *model))


def test_overlays_show_the_ground_truth_beside_the_prediction_and_its_iou(tmp_path):
    image = np.full((10, 12, 3), 90, np.uint8)
    gt = np.zeros((10, 12), bool)
    gt[2:6, 2:6] = True
    half = gt.copy()
    half[4:6] = False  # IoU 8 / 16
    ignore = np.zeros_like(gt)
    ignore[5] = True  # on sample 5: IoU 8 / 12, the GT's last row ignored

    def sample(i: int) -> Sample:
        masks = [] if i == 9 else [gt]
        return Sample(image, f"sentence {i}", masks, np.array([[2, 2, 6, 6]] if masks else []).reshape(-1, 4),
                      "gres", "test", "val", i, f"s{i}", tmp_path, ignore=ignore if i == 5 else None)

    def record(i: int) -> dict:
        if i == 3:
            return {"key": "3", "index": 3, "error": "CorruptImageError: x", "valid": False}
        masks = [] if i == 9 else [half]
        return {"key": str(i), "index": i, "valid": True, "reason": "ok", "no_target": i == 9,
                "masks": [encode_rle(m) for m in masks], "boxes": [[2, 2, 6, 4]] if masks else [],
                "points": [[[3, 3]]] if masks else [], "labels": [[1]] if masks else []}

    path = write_records(tmp_path / "p.jsonl", {}, [record(i) for i in range(10)])
    written = write_overlays(path, [sample(i) for i in range(10)], tmp_path / "ov", 3)
    # The unreadable record is left out; the picks spread over the other nine, first to last.
    assert [p.name for p in written] == ["00000.png", "00005.png", "00009.png"]
    for png, i in zip(written, (0, 5, 9), strict=True):
        out = np.asarray(Image.open(png).convert("RGB"))
        left = overlay(image, masks=sample(i).masks, boxes=sample(i).boxes, scale=33, ignore=sample(i).ignore,
                       title="ground truth: no target" if i == 9 else "ground truth")
        right = overlay(image, masks=[] if i == 9 else [half], boxes=[] if i == 9 else [[2, 2, 6, 4]],
                        points=[] if i == 9 else [[3, 3]], labels=[] if i == 9 else [1], scale=33,
                        title={0: "prediction: IoU 0.500", 5: "prediction: IoU 0.667", 9: "prediction: no target"}[i])
        assert out.shape == (14 + 330, 396 + 4 + 396, 3)  # 12 px wide, drawn 33x (400 // 12)
        assert np.array_equal(out[14:, :396], np.asarray(left)) and np.array_equal(out[14:, 400:], np.asarray(right))


def test_unreadable_samples_are_counted_left_out_and_retried_on_resume(workspace, synthetic, tmp_path, monkeypatch):
    shutil.copytree(synthetic.root, tmp_path / "data" / "synthetic")
    cfg = _eval_cfg(workspace, tmp_path / "out", f"paths.data_dir={tmp_path / 'data'}")
    ds = build_dataset(cfg.dataset, "val")
    corrupt, resized = ds.records[0]["image_path"], next(
        r["image_path"] for r in ds.records if r["image_path"] != ds.records[0]["image_path"])
    corrupt.write_bytes(b"not a png")
    Image.new("RGB", (7, 5)).save(resized)
    bad = sum(r["image_path"] in (corrupt, resized) for r in ds.records)
    inst_path = tmp_path / "data" / "synthetic" / "refer_seg" / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    lost = ds.records[-1]["ann_ids"][0]  # its sentences are skipped when the split is read, and counted
    inst["annotations"] = [a for a in inst["annotations"] if a["id"] != lost]
    inst_path.write_text(json.dumps(inst))
    skipped = sum(lost in r["ann_ids"] for r in ds.records)
    ds = build_dataset(cfg.dataset, "val")
    m = _run(cfg, Oracle())
    assert m["skipped"] == skipped > 0 and m["unreadable"] == bad and m["n"] == len(ds) - bad
    assert m["cIoU"] == 1.0 and m["invalid_rate"] == 0.0
    records = read_shard(tmp_path / "out" / "predictions.jsonl")[1]
    errors = [r["error"] for r in records if "error" in r]
    assert len(records) == len(ds) and len(errors) == bad  # nothing lost: each keeps its line and its reason
    assert {e.split(":")[0] for e in errors} == {"CorruptImageError", "MalformedSampleError"}
    assert rescore(tmp_path / "out" / "predictions.jsonl", cfg.dataset) == m
    # A resume retries them: still unreadable, they are recorded again, and no model is loaded for them ...
    monkeypatch.setattr("sam4mllm.evaluate.build_predictor", lambda cfg: pytest.fail("a model was loaded"))
    assert evaluate(cfg) == m and read_shard(tmp_path / "out" / "predictions.jsonl")[1] == records
    # ... repaired, they are predicted: the resumed output equals a fresh run's on the repaired data.
    for path in (corrupt, resized):
        shutil.copy(synthetic.root / path.relative_to(tmp_path / "data" / "synthetic"), path)
    fresh = _eval_cfg(workspace, tmp_path / "fresh", f"paths.data_dir={tmp_path / 'data'}")
    assert _run(cfg, Oracle()) == _run(fresh, Oracle()) and m["unreadable"] > 0
    resumed, clean = (read_shard(d / "predictions.jsonl")[1] for d in (tmp_path / "out", tmp_path / "fresh"))
    assert resumed == clean and not any("error" in r for r in clean)


def test_a_resume_on_the_same_kind_of_device_continues_and_on_another_is_refused(workspace, tmp_path, monkeypatch):
    m = _run(_eval_cfg(workspace, tmp_path / "out", "model.device=auto"), Oracle())
    assert _run(_eval_cfg(workspace, tmp_path / "out", "model.device=cpu"), Oracle()) == m
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the same command on a GPU machine
    with pytest.raises(FileExistsError, match="another configuration"):
        _run(_eval_cfg(workspace, tmp_path / "out", "model.device=auto"), Oracle())


def test_a_killed_evaluation_resumes_with_another_batch_size_overlay_count_or_sweep_but_not_other_settings(
        workspace, tmp_path):
    """What does not change a record (eval.batch_size, overlays, the threshold sweep) may change on resume,
    e.g. a smaller batch after running out of GPU memory; a setting that predicts may not."""
    done = _run(_eval_cfg(workspace, tmp_path / "once", "eval.overlays=0"), Oracle(garbage_every=3))
    shard = shard_path(tmp_path / "out", 0, 1)
    _run(_eval_cfg(workspace, tmp_path / "out", "eval.batch_size=4", "eval.overlays=0"), Oracle(garbage_every=3))
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:9]) + lines[9][:20])  # killed after 8 records, mid-line
    (tmp_path / "out" / "predictions.jsonl").unlink()
    resumed = ("eval.batch_size=2", "eval.overlays=3", "eval.rethreshold=[0.95]")
    with pytest.raises(FileExistsError, match="another configuration"):  # round 2's threshold predicts
        _run(_eval_cfg(workspace, tmp_path / "out", *resumed, "eval.pqpp.threshold=0.8"), Oracle(garbage_every=3))
    assert _run(_eval_cfg(workspace, tmp_path / "out", *resumed), Oracle(garbage_every=3)) == done
    assert [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()] == [
        json.loads(x) for x in (tmp_path / "once" / "predictions.jsonl").read_text().splitlines()]
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3


def test_a_batch_that_runs_out_of_gpu_memory_is_retried_in_halves(workspace, tmp_path, caplog):
    one = _run(_eval_cfg(workspace, tmp_path / "one", "eval.overlays=0"), Oracle(garbage_every=3))
    asked: list[int] = []
    with caplog.at_level("WARNING", logger="sam4mllm.evaluate"):
        split = _run(_eval_cfg(workspace, tmp_path / "split", "eval.overlays=0", "eval.batch_size=8"),
                     Oracle(garbage_every=3), fits=3, asked=asked)
    assert split == one
    assert [json.loads(x) for x in (tmp_path / "split" / "predictions.jsonl").read_text().splitlines()] == [
        json.loads(x) for x in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert asked[:5] == [8, 4, 2, 2, 4]  # 8 -> 4 + 4, each 4 -> 2 + 2
    assert sum(n for n in asked if n <= 3) == one["n"]  # each sentence predicted once, by a batch that fit
    assert caplog.text.count("ran out of GPU memory") == sum(n > 3 for n in asked)  # each split said
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one sentence alone does not fit: nothing to split
        _run(_eval_cfg(workspace, tmp_path / "none", "eval.overlays=0", "eval.batch_size=8"), Oracle(), fits=0)


def test_evaluator_resumes_and_shards_merge_to_the_single_process_result(workspace, tmp_path):
    single = _run(_eval_cfg(workspace, tmp_path / "one"), Oracle(garbage_every=3))
    ref = (tmp_path / "one" / "predictions.jsonl").read_bytes()
    # Two shards, the first killed mid-line and resumed.
    _run(_eval_cfg(workspace, tmp_path / "two", "shard.index=0", "shard.count=2"), Oracle(garbage_every=3))
    shard0 = shard_path(tmp_path / "two", 0, 2)
    lines = shard0.read_text().splitlines(keepends=True)
    shard0.write_text("".join(lines[:4]) + lines[4][:30])
    assert _run(_eval_cfg(workspace, tmp_path / "two", "shard.index=1", "shard.count=2"), Oracle(3)) is None
    merged = _run(_eval_cfg(workspace, tmp_path / "two", "shard.index=0", "shard.count=2"), Oracle(3))
    assert (tmp_path / "two" / "predictions.jsonl").read_bytes() != b""
    assert merged["cIoU"] == pytest.approx(single["cIoU"]) and merged["n"] == single["n"]
    a = [json.loads(x) for x in ref.decode().splitlines()[1:]]
    b = [json.loads(x) for x in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()[1:]]
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]


def test_a_resume_on_another_shard_count_predicts_each_sentence_once(workspace, tmp_path):
    """A job killed on 2 processes (one shard finished, the other never started) and resumed on 3:
    the finished shard's sentences are not predicted again, and the result is one process's."""
    single = _run(_eval_cfg(workspace, tmp_path / "one"), Oracle(garbage_every=3))
    asked: list[int] = []
    _run(_eval_cfg(workspace, tmp_path / "two", "shard.index=0", "shard.count=2"), Oracle(3), asked=asked)
    first = sum(asked)
    for i in range(3):
        merged = _run(_eval_cfg(workspace, tmp_path / "two", f"shard.index={i}", "shard.count=3"), Oracle(3),
                      asked=asked)
    assert 0 < first < sum(asked) == single["n"]  # every sentence predicted once, in all
    assert merged == single
    # The merge removed the superseded shard of 2 (its sentences are in this count's) and kept this count's.
    assert sorted(p.name for p in (tmp_path / "two").glob("shard-*")) == [shard_path(tmp_path, i, 3).name
                                                                       for i in range(3)]

    def records(out):
        return [{k: v for k, v in r.items() if k != "timings"} for r in read_shard(out / "predictions.jsonl")[1]]

    assert records(tmp_path / "two") == records(tmp_path / "one")


def test_shards_get_whole_images_so_each_is_read_and_embedded_once(workspace, tmp_path, monkeypatch):
    """Every sentence of an image goes to one shard, in a row: its image is decoded once to predict
    (and once more to score) and the segmenter embeds it once, however many sentences and shards
    (not once per sentence and shard)."""
    from sam4mllm.data import refer

    decoded: list[Path] = []
    monkeypatch.setattr(refer, "load_image", lambda path, *a, real=refer.load_image: decoded.append(path)
                        or real(path, *a))
    segmenter = GrabCutSegmenter()

    class Embeds:  # what Sam4MLLM.segment does with the segmenter: embed the image, then prompt it
        def segment_many(self, items):
            for image, _, _ in items:
                segmenter.set_image(image)
            return [SegmentResult([], np.zeros((0, 4)), text="No object found.", no_target=True) for _ in items]

    per_shard = []
    for i in range(3):
        evaluate(_eval_cfg(workspace, tmp_path, f"shard.index={i}", "shard.count=3", "eval.overlays=0"), Embeds())
        per_shard.append({r["sample_id"] for r in read_shard(shard_path(tmp_path, i, 3), partial=True)[1]})
    ds = build_dataset(_eval_cfg(workspace, tmp_path).dataset, "val")
    image_of = {f"{ds.name}/val/{r['ref_id']}/{r['sent_id']}": r["image_path"] for r in ds.records}
    images = set(image_of.values())
    assert len(ds) > len(images) and all(per_shard)  # sentences share images; every shard has work
    assert Counter(decoded) == dict.fromkeys(images, 2) and segmenter.embed_count == len(images)
    shard_images = [{image_of[s] for s in shard} for shard in per_shard]
    assert sum(map(len, shard_images)) == len(images)  # no image split over shards
    assert len(read_shard(tmp_path / "predictions.jsonl")[1]) == len(ds)


def test_pqpp_boxes_resegmented_equal_box_only_and_gain_from_gt_point_answers(workspace, adapter, tmp_path):
    from sam4mllm.demo import from_pqpp_boxes
    from sam4mllm.evaluate import pqpp_config

    answers = ["<|box_start|>(100,150),(600,700)<|box_end|>", "<|box_start|>(300,200),(900,800)<|box_end|>",
               "No object found.", "a box, I think"]

    class Varied(Scripted):  # round 1 depends on the sentence: boxes, no target and garbage
        def generate(self, question, image, keep_cache=False):
            self.text = answers[len(question) % len(answers)]
            return super().generate(question, image, keep_cache)

    metrics, records = {}, {}
    for variant in ("pqpp", "box_only"):
        cfg = _eval_cfg(workspace, tmp_path / variant, "dataset=synthetic_gres", f"variant={variant}")
        metrics[variant] = evaluate(cfg, Varied(adapter, variant, "", p_yes=lambda n: np.linspace(0, 1, n)))
        records[variant] = [json.loads(x) for x in (tmp_path / variant / "predictions.jsonl").read_text().splitlines()]
    derived = from_pqpp_boxes(tmp_path / "pqpp", tmp_path / "derived", cfg.dataset, GrabCutSegmenter(), 2)
    drop = ("seconds_per_sample",)  # the derived file has no model timings
    assert {k: v for k, v in derived.items() if k not in drop} == {
        k: v for k, v in metrics["box_only"].items() if k not in drop}
    got = [json.loads(x) for x in (tmp_path / "derived" / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("masks") for r in got[1:]] == [r.get("masks") for r in records["box_only"][1:]]
    assert metrics["pqpp"]["gIoU"] != derived["gIoU"]  # PQPP's points changed its masks; the derived rows drop them
    assert 0 < derived["invalid_rate"] < 1 and derived["N-acc"] > 0 and derived["gIoU"] > 0

    # The same boxes with round 2's grid answered by the GT masks: a perfect points round.
    grid = pqpp_config(cfg)
    oracle = from_pqpp_boxes(tmp_path / "pqpp", tmp_path / "oracle", cfg.dataset, GrabCutSegmenter(), 0, grid)
    ds = build_dataset(cfg.dataset, "val")
    for r in [json.loads(x) for x in (tmp_path / "oracle" / "predictions.jsonl").read_text().splitlines()[1:]]:
        gt = ds[int(r["key"])].union_mask()
        for pts, labels in zip(r["points"], r["labels"], strict=True):
            assert len(pts) == grid.grid ** 2 and [int(gt[y, x]) for x, y in pts] == labels
        assert len(r["points"]) == len(r.get("boxes") or [])
    n_boxes = sum(len(r.get("boxes") or []) for r in records["pqpp"][1:])
    assert oracle["points"] == n_boxes * grid.grid ** 2 and oracle["points_right"] == 1.0  # GT answers: all right
    assert derived["points"] == 0 and derived["points_right"] is None
    assert 0 < metrics["pqpp"]["points_right"] < 1  # the scripted answers ignore the image
    # These boxes span several shapes: negative points on the others must help the segmenter,
    # and all-negative answers in a box over no target must empty its mask (which is still not a
    # "no target" answer: N-acc counts the model's answers, as the GRES official code does).
    assert oracle["cIoU"] > derived["cIoU"] + 0.05 and oracle["N-acc"] == derived["N-acc"]
    boxed_empty = [r for r in (json.loads(x) for x in (tmp_path / "oracle" / "predictions.jsonl").read_text()
                               .splitlines()[1:]) if r.get("boxes") and not ds[int(r["key"])].masks]
    assert boxed_empty and not any(decode_segmentation(m, *ds[int(r["key"])].size).any()
                                   for r in boxed_empty for m in r["masks"])


def test_evaluation_of_a_retrained_checkpoint_does_not_resume_the_old_predictions(workspace, tmp_path):
    ckpt = tmp_path / "run" / "final"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"old weights")
    cfg = _eval_cfg(workspace, tmp_path / "ev", f"checkpoint={ckpt}")
    first = _run(cfg, Oracle())
    assert _run(cfg, Oracle(garbage_every=2)) == first  # same checkpoint: everything resumed, nothing re-predicted
    (ckpt / "model.safetensors").write_bytes(b"new weights, retrained")
    with pytest.raises(FileExistsError, match="another configuration"):
        _run(cfg, Oracle())


def test_predict_reads_a_photo_as_its_exif_orientation_shows_it(workspace, adapter, tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag is segmented, and its mask written,
    the way up a viewer shows it (not in the stored frame, where "left" is another place)."""
    from sam4mllm.data.base import load_image
    from sam4mllm.evaluate import predict_image

    shown = np.full((60, 100, 3), 220, np.uint8)
    shown[10:40, 20:70] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    photo = tmp_path / "photo.jpg"
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif, quality=95, subsampling=0)
    box = "<|box_start|>(200,150),(700,650)<|box_end|>"
    cfg = workspace("predict", f"image={photo}", "text='the red box'", f"out_dir={tmp_path / 'out'}")
    [record] = predict_image(cfg, Scripted(adapter, "pqpp", box, p_yes=lambda n: np.linspace(0, 1, n)))
    assert np.asarray(Image.open(tmp_path / "out/the-red-box/mask.png")).shape == shown.shape[:2]
    turned = load_image(photo, exif_orientation=True)
    assert np.abs(turned.astype(int) - shown).max() < 16  # JPEG's error only
    alone = Scripted(adapter, "pqpp", box, p_yes=lambda n: np.linspace(0, 1, n)).segment(turned, "the red box")
    assert record["boxes"] == alone.boxes.tolist() == [[20.0, 9.0, 70.0, 39.0]]


def test_predict_writes_one_images_record_mask_and_overlay(workspace, adapter, tmp_path):
    from sam4mllm.evaluate import predict_image
    from sam4mllm.viz import side_by_side

    image = _flat_image()
    png = tmp_path / "photo.png"
    Image.fromarray(image).save(png)
    box = "<|box_start|>(250,150),(850,650)<|box_end|>"

    def predict(text, *extra, sentences="'the red box'"):
        cfg = workspace("predict", f"image={png}", f"text={sentences}", f"out_dir={tmp_path / 'out'}", *extra)
        return predict_image(cfg, Scripted(adapter, "pqpp", text, p_yes=lambda n: np.linspace(0, 1, n)))

    [record] = predict(box)
    out = tmp_path / "out" / "the-red-box"
    alone = Scripted(adapter, "pqpp", box, p_yes=lambda n: np.linspace(0, 1, n)).segment(image, "the red box")
    saved = json.loads((out / "result.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["sentence"] == "the red box" and saved["text"] == box
    assert record["boxes"] == alone.boxes.tolist() and record["points"] == [p.tolist() for p in alone.points]
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, alone.union(image.shape[:2]))
    drawn = overlay(image, masks=alone.masks, boxes=alone.boxes, points=[q for g in alone.points for q in g],
                    labels=[lb for g in alone.labels for lb in g], scale=5)
    assert np.array_equal(np.asarray(Image.open(out / "overlay.png").convert("RGB")),
                          np.asarray(side_by_side([drawn], "the red box")))
    # Several sentences: each in a folder of its words (a repeat numbered), each as if asked alone.
    many = predict(box, sentences="['It, on the left!',the red box,the red box,the red box]")
    assert [Path(r["folder"]).name for r in many] == ["it-on-the-left", "the-red-box", "the-red-box-2",
                                                      "the-red-box-3"]
    assert {k: v for k, v in many[1].items() if k != "timings"} == {
        k: v for k, v in record.items() if k != "timings"}
    assert [r["sentence"] for r in many] == ["It, on the left!", "the red box", "the red box", "the red box"]

    class DiesOnTheSecondBatch(Scripted):
        def segment_many(self, items):
            self.batches = getattr(self, "batches", 0) + 1
            assert self.batches == 1, "killed"
            return super().segment_many(items)

    cfg = workspace("predict", f"image={png}", "text=[first,second]", f"out_dir={tmp_path / 'dies'}")
    with pytest.raises(AssertionError, match="killed"):
        predict_image(cfg, DiesOnTheSecondBatch(adapter, "pqpp", box, p_yes=lambda n: np.linspace(0, 1, n)))
    assert [f.name for f in (tmp_path / "dies").iterdir()] == ["first"]  # written as its batch ended
    assert (tmp_path / "dies" / "first" / "result.json").is_file()
    # "No target" (GRES) and garbage give an empty mask, said so on the picture and in the record.
    for text, task, key in (("No object found.", "gres", "no_target"), ("a box, I think", "res", "reason")):
        [record] = predict(text, f"task={task}")
        assert not np.asarray(Image.open(out / "mask.png")).any()
        assert record["no_target"] if key == "no_target" else not record["valid"] and record["reason"] != "ok"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere.jpg")):
        predict_image(workspace("predict", f"image={tmp_path / 'nowhere.jpg'}", "text=x"), object())
    with pytest.raises(ValueError, match="task='vqa'"):
        predict(box, "task=vqa")
    with pytest.raises(ValueError, match="a sentence, or a list"):
        predict(box, sentences="[]")
    with pytest.raises(ValueError, match=r"eval\.batch_size=0: sentences per round-1 batch must be >= 1"):
        predict(box, "eval.batch_size=0")


def test_predict_script_as_typed_names_its_output_after_the_image_and_sentence(workspace):
    ds = build_dataset(workspace("eval").dataset, "val")
    record = ds.records[0]
    r = subprocess.run([sys.executable, "scripts/predict.py", f"image={record['image_path']}",
                        f"text='{record['expression']}'", "checkpoint=null", *workspace.base],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    words = "-".join(re.findall(r"[a-z0-9]+", record["expression"].lower()))
    out = workspace.out / "predict" / "pqpp-qwen2vl@untrained" / Path(record["image_path"]).stem / words
    saved = json.loads((out / "result.json").read_text())
    assert f"answer {saved['text']!r}" in r.stdout and saved["text"] and str(out) in r.stdout
    assert saved["sentence"] == record["expression"]
    assert np.asarray(Image.open(out / "mask.png")).shape == ds[0].size


def test_eval_script_as_typed_names_the_missing_data_and_the_fix(tmp_path):
    r = subprocess.run([sys.executable, "scripts/eval.py", "dataset=refcocog", f"paths.data_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "refs(umd).p" in r.stderr and "python scripts/prepare_data.py dataset=refcocog" in r.stderr
    assert "Expected layout:\n<data_dir>/\n  refer_seg/" in r.stderr  # as lines, not a repr's escapes


def test_eval_script_multirun_writes_each_split_where_the_tables_read_it(workspace, tmp_path):
    """README: Table 2's evaluations as a Hydra multirun over datasets and splits, each in its own folder."""
    from sam4mllm.tables import collect

    r = subprocess.run([sys.executable, "scripts/eval.py", "-m", workspace.base[0], f"paths.output_dir={tmp_path}",
                        "dataset=synthetic,synthetic_gres", "split=val,testA", "checkpoint=null",
                        "eval.max_new_tokens=4", "eval.overlays=0", "progress=false"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = collect(tmp_path / "eval")
    assert sorted((d, s) for _, d, s, _ in runs) == [(d, s) for d in ("synthetic", "synthetic_gres")
                                                     for s in ("testA", "val")]
    assert all(m["n"] > 0 and m["invalid_rate"] == 1.0 for m in runs.values())  # 4 tokens cut every answer


def test_evaluation_that_failed_before_its_first_sample_reruns_with_the_fix(workspace, tmp_path):
    """A mistyped model path leaves a header-only shard; the corrected command must not be refused."""
    out = tmp_path / "ev"
    with pytest.raises(FileNotFoundError, match="no model folder"):
        evaluate(_eval_cfg(workspace, out, "model=qwen2vl_7b", f"model.path={tmp_path / 'typo'}"))
    assert shard_path(out, 0, 1).exists()
    fixed = _run(_eval_cfg(workspace, out), Oracle())
    assert fixed == _run(_eval_cfg(workspace, tmp_path / "clean"), Oracle())


def test_evaluation_checks_its_run_and_segmenter_before_the_backbone_loads(workspace, tmp_path, caplog):
    """The 7B's weights are missing: a missing run, one of another family or variant, and a missing
    SAM file must each fail on their own error first."""
    from sam4mllm.evaluate import build_predictor
    from sam4mllm.sam.base import CheckpointNotFoundError

    cfg = lambda *a: _eval_cfg(workspace, tmp_path / "ev", "model=qwen2vl_7b",  # noqa: E731
                               f"model.path={tmp_path / 'no_weights'}", *a)
    with pytest.raises(FileNotFoundError, match=r"no model folder at .*no_weights"):  # for contrast
        build_predictor(cfg())
    with pytest.raises(FileNotFoundError, match=r"no trained checkpoint at .*no_run.*\n?.*checkpoint=null"):
        build_predictor(cfg(f"checkpoint={tmp_path / 'no_run'}"))
    other = tmp_path / "llava_run"
    other.mkdir()
    (other / "sam4mllm.json").write_text(json.dumps({"family": "llava_next", "finetune": "lora", "base": "x"}))
    with pytest.raises(ValueError, match=r"was trained on llava_next, not qwen2vl: .*model=\.\.\., its backbone was x"):
        build_predictor(cfg(f"checkpoint={other}"))
    with pytest.raises(CheckpointNotFoundError, match=r"sam_vit_h_4b8939\.pth"):
        build_predictor(cfg("sam=sam_vit_h", f"sam.checkpoint={tmp_path / 'sam_vit_h_4b8939.pth'}"))
    # A run trained on the other variant's dialogs is refused; box-only reads a PQPP run.
    for variant, mode in (("ppg", "per_point"), ("pqpp", "joint")):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "sam4mllm.json").write_text(json.dumps(
            {"family": "qwen2vl", "finetune": "lora", "base": "x", "variant": variant, "pqpp_mode": mode}))
    with pytest.raises(ValueError, match=r"was trained as ppg, but variant=pqpp .*: set variant=ppg$"):
        build_predictor(cfg(f"checkpoint={tmp_path / 'ppg'}"))
    with pytest.raises(ValueError, match=r"trained as pqpp, but variant=ppg .*: set variant=pqpp \(or box_only\)"):
        build_predictor(cfg(f"checkpoint={tmp_path / 'pqpp'}", "variant=ppg"))
    for variant in ("box_only", "pqpp"):  # accepted: on to the backbone, whose weights are missing
        with pytest.raises(FileNotFoundError, match="no model folder"):
            build_predictor(cfg(f"checkpoint={tmp_path / 'pqpp'}", f"variant={variant}"))
    assert caplog.text.count("trained with pqpp_mode=joint but is asked with eval.pqpp.mode=per_point") == 1


def test_rethresholding_an_evaluation_that_kept_every_answer_equals_evaluating_at_that_threshold(
        workspace, adapter, tmp_path):
    """Paper Table 6a from one pass: evaluate at threshold 0, re-segment at 0.8 without the model."""
    from sam4mllm.evaluate import rethreshold, threshold_sweep

    box = "<|box_start|>(100,150),(600,700)<|box_end|>"
    runs, records = {}, {}
    for name, t in (("table6a", 0.0), ("direct", 0.8)):
        cfg = _eval_cfg(workspace, tmp_path / "pqpp-qwen2vl" / "refcocog-val" / name, "dataset=synthetic_gres",
                        f"eval.pqpp.threshold={t}", "eval.rethreshold=[0.8]")
        # 25 grid answers per box with P(Yes) from 0 to 1: confidences from 1 down to 0.5 and back
        predictor = Scripted(adapter, "pqpp", box, p_yes=lambda n: np.linspace(0, 1, n), pqpp=PQPPConfig(threshold=t))
        runs[name] = evaluate(cfg, predictor)
        records[name] = _records(cfg.out_dir)
        if name == "table6a":
            swept = threshold_sweep(cfg, GrabCutSegmenter())
    out = tmp_path / "pqpp-qwen2vl" / "refcocog-val" / "thr0.8@untrained"  # tagged as its checkpoint=null run
    drop = ("seconds_per_sample",)  # the re-segmented file has no model timings
    assert {k: v for k, v in swept[0].items() if k not in drop} == {
        "threshold": 0.8, **{k: v for k, v in runs["direct"].items() if k not in drop}}
    again = _records(out)
    for key in ("masks", "points", "labels", "confidences", "boxes", "valid"):
        assert [r.get(key) for r in again] == [r.get(key) for r in records["direct"]], key
    assert 0 < runs["direct"]["points"] < runs["table6a"]["points"]  # some answers dropped, some kept
    assert runs["direct"]["cIoU"] != runs["table6a"]["cIoU"]
    # A file that dropped answers cannot give a lower threshold; a box-only file has none to filter.
    with pytest.raises(ValueError, match=r"eval.pqpp.threshold=0.6 or lower"):
        rethreshold(out / "predictions.jsonl", tmp_path / "x", cfg.dataset, GrabCutSegmenter(), 0.6)
    # A file written before predictions recorded a separate "Yes" bar is read as symmetric (0.8 for both).
    lines = (tmp_path / "pqpp-qwen2vl" / "refcocog-val" / "direct" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["header"].pop("pqpp_yes_threshold") == 0.8
    old = tmp_path / "old.jsonl"
    old.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"0.8 \(No\) / 0.8 \(Yes\)"):
        rethreshold(old, tmp_path / "o1", cfg.dataset, GrabCutSegmenter(), 0.8, yes_threshold=0.7)
    stricter = rethreshold(old, tmp_path / "o2", cfg.dataset, GrabCutSegmenter(), 0.8, yes_threshold=0.9)
    assert 0 < stricter["points"] < runs["direct"]["points"]
    for bad in (["variant=box_only"], ["eval.pqpp.threshold=0.9"]):  # refused before anything is evaluated
        with pytest.raises(ValueError, match=r"eval\.rethreshold=\[0\.8\] re-segments"):
            evaluate(_eval_cfg(workspace, tmp_path / "bad", "eval.rethreshold=[0.8]", *bad), None)
    box_only = _eval_cfg(workspace, tmp_path / "box_only", "variant=box_only")
    evaluate(box_only, Scripted(adapter, "box_only", box))
    with pytest.raises(ValueError, match="not a PQPP evaluation"):
        rethreshold(tmp_path / "box_only" / "predictions.jsonl", tmp_path / "y", box_only.dataset, None, 0.9)


def test_metrics_record_the_official_split_size_and_warn_when_part_of_it_was_scored(
        workspace, adapter, tmp_path, caplog):
    """A figure over part of a split (images missing, a subset) must not pass for the published protocol."""
    from omegaconf import OmegaConf

    from sam4mllm.evaluate import rescore

    cfg = _eval_cfg(workspace, tmp_path / "run", "variant=box_only")
    scored = evaluate(cfg, Scripted(adapter, "box_only", "<|box_start|>(100,150),(600,700)<|box_end|>"))
    assert scored["official_n"] is None  # the synthetic benchmark has no official split sizes
    for official, warned in ((scored["n"], False), (scored["n"] + 1, True)):
        caplog.clear()
        dataset = OmegaConf.merge(cfg.dataset, {"official_counts": {cfg.dataset.split: official}})
        again = rescore(tmp_path / "run" / "predictions.jsonl", dataset)
        assert again == {**scored, "official_n": official}
        assert ("not comparable with published ones" in caplog.text) == warned


def test_the_reference_codes_point_filter_keeps_no_above_0_9_and_yes_above_0_75(workspace, adapter, tmp_path):
    """eval=official's thresholds: evaluated directly, and re-segmented from a pass that kept every answer."""
    from sam4mllm.evaluate import pqpp_config, rethreshold

    box = "<|box_start|>(100,150),(600,700)<|box_end|>"
    p_yes = np.linspace(0, 1, 25)
    official = ["eval.pqpp.threshold=0.9", "eval.pqpp.yes_threshold=0.75"]
    runs = {}
    for name, extra in (("every", ["eval.pqpp.threshold=0"]), ("official", official)):
        cfg = _eval_cfg(workspace, tmp_path / name, "dataset=synthetic_gres", *extra)
        pqpp = pqpp_config(cfg)
        evaluate(cfg, Scripted(adapter, "pqpp", box, p_yes=lambda n: p_yes, pqpp=pqpp))
        runs[name] = _records(cfg.out_dir)
    # The reference code's rule, written out: "No" if P(No) > 0.9, else "Yes" if P(Yes) > 0.75.
    no, yes = 1 - p_yes > 0.9, (1 - p_yes <= 0.9) & (p_yes > 0.75)
    boxed = [(a, b) for a, b in zip(runs["every"], runs["official"], strict=True) if a.get("boxes")]
    assert boxed and all(len(a["points"][0]) == 25 for a, _ in boxed)  # threshold 0 keeps every grid answer
    for a, b in boxed:
        assert b["points"][0] == np.asarray(a["points"][0])[no | yes].tolist()
        assert b["labels"][0] == yes[no | yes].astype(int).tolist()
    again = rethreshold(tmp_path / "every" / "predictions.jsonl", tmp_path / "re", cfg.dataset, GrabCutSegmenter(),
                        0.9, yes_threshold=0.75)
    for key in ("masks", "points", "labels", "confidences"):
        assert [r.get(key) for r in _records(tmp_path / "re")] == [r.get(key) for r in runs["official"]], key
    # Its file holds no "Yes" at or below 0.75: a Yes bar under that is refused, a stricter one is not.
    with pytest.raises(ValueError, match="needs the ones it dropped"):
        rethreshold(tmp_path / "official" / "predictions.jsonl", tmp_path / "x", cfg.dataset, GrabCutSegmenter(),
                    0.9, yes_threshold=0.6)
    assert rethreshold(tmp_path / "official" / "predictions.jsonl", tmp_path / "y", cfg.dataset, GrabCutSegmenter(),
                       0.95)["points"] < again["points"]


def _records(out_dir):
    return [json.loads(x) for x in (Path(out_dir) / "predictions.jsonl").read_text().splitlines()[1:]]


def test_paper_tables_put_ours_next_to_the_paper(tmp_path):
    from sam4mllm.tables import render_tables

    run = tmp_path / "pqpp-qwen2vl" / "refcocog-val" / "default"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"dataset": "refcocog", "split": "val", "variant": "pqpp",
                                                  "cIoU": 0.5123, "n": 4896, "official_n": 4896}))
    abl = tmp_path / "pqpp-qwen2vl" / "refcocog-val" / "thr0.6"
    abl.mkdir(parents=True)
    (abl / "metrics.json").write_text(json.dumps({"dataset": "refcocog", "split": "val", "variant": "pqpp",
                                                  "cIoU": 0.25}))
    swept = tmp_path / "pqpp-qwen3vl" / "refcocog-val" / "thr0.9"  # eval=table6a's 0.9 row, no default run
    swept.mkdir(parents=True)
    (swept / "metrics.json").write_text(json.dumps({"dataset": "refcocog", "split": "val", "variant": "pqpp",
                                                    "cIoU": 0.33}))
    ppg = tmp_path / "ppg-qwen2vl" / "refcocog-val" / "default"
    ppg.mkdir(parents=True)
    (ppg / "metrics.json").write_text(json.dumps({"dataset": "refcocog", "split": "val", "variant": "ppg",
                                                  "cIoU": 0.4567, "n": 4000, "official_n": 4896}))
    synthetic = tmp_path / "pqpp-qwen2vl" / "synthetic-val" / "default"  # in no paper table
    synthetic.mkdir(parents=True)
    (synthetic / "metrics.json").write_text(json.dumps({"dataset": "synthetic", "split": "val", "variant": "pqpp",
                                                        "cIoU": 0.9}))
    text = render_tables(tmp_path)
    assert text.split("no table shows (run, dataset, split, eval):\n")[1] == "- pqpp-qwen2vl synthetic val default"
    assert "51.2 / 74.5" in text          # Table 2, refcocog val: ours / paper PQPP
    assert "- / 75.2" in text              # refcocog test: no run, paper only
    assert "25.0 / 69.5" in text         # Table 6, threshold 0.6
    assert re.search(r"\| pqpp-qwen3vl +\| default +\| 33\.0 / 74\.5 +\|", text)  # Table 6's 0.9 row from thr0.9
    assert "45.7* (n=4000 of 4896) / 74.2" in text  # Table 2, PPG: on part of the split, and marked so
    table6 = text.split("### Table 6")[1]
    assert "ppg-qwen2vl" not in table6    # the ablations are PQPP's: no PPG rows beside its numbers
    assert "No evaluation found" not in text
    assert "No evaluation found" in render_tables(tmp_path / "pqpp-qwen2vl" / "refcocog-val")  # no run at this depth
    with pytest.raises(FileNotFoundError, match="no evaluation folder"):
        render_tables(tmp_path / "typo")


def test_vqa_evaluation_uses_the_official_accuracy(workspace, tmp_path):
    from sam4mllm.metrics import vqa_accuracy

    cfg = _eval_cfg(workspace, tmp_path / "vqa", "dataset=synthetic_vqa", "eval.batch_size=4")
    ds = build_dataset(cfg.dataset, cfg.split)

    from sam4mllm.sam.base import image_digest

    # Every other question gets the first human answer as that human spelled it, the rest a wrong one.
    given = [r["answers"][0] if i % 2 == 0 else "zebra" for i, r in enumerate(ds.records)]
    lookup = {(ds[i].expression, image_digest(ds[i].image)): a for i, a in enumerate(given)}

    class Answers:
        def generate_many(self, questions, images):
            from sam4mllm.inference import Prefix

            answers = [lookup[(q.split("\n")[0], image_digest(im))] for q, im in zip(questions, images, strict=True)]
            return [(a, Prefix({}, [], truncated=a == "zebra")) for a in answers]  # as if the budget had cut it

    m = evaluate(cfg, Answers())
    expected = 100 * np.mean([vqa_accuracy(a, r["answers"]) for a, r in zip(given, ds.records, strict=True)])
    assert m["accuracy"] == pytest.approx(expected) and 0 < m["accuracy"] < 100
    assert m["truncated"] == given.count("zebra") > 0


def test_joint_round_two_first_step_equals_a_single_forward(workspace):
    """Official-code joint mode: the first answer step's probabilities are those of one plain forward."""
    adapter = instantiate(workspace("train", "+exp=pqpp").model)
    m = Sam4MLLM(adapter, GrabCutSegmenter())
    from sam4mllm.dialogs import joint_question

    given = Dialog([(box_question("the red circle", "res"), adapter.fmt.encode([TargetPrompt((10, 20, 500, 600))]))])
    pts = [Point(100, 200), Point(300, 400), Point(450, 550)]
    q = joint_question(adapter.fmt, (10, 20, 500, 600), pts)
    jy, jn = m.score_joint(given, IMAGE, q, len(pts))
    ry, rn = m.score_points(m.prefix_from_dialog(given, IMAGE, with_cache=False), [q], fast=False)
    assert jy.shape == (3,) and np.all(jy + jn <= 1 + 1e-6)
    np.testing.assert_allclose([jy[0], jn[0]], [ry[0], rn[0]], atol=1e-5)
