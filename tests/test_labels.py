"""PPG / PQPP label generators and the sharded, resumable label job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.data import MalformedSampleError
from sam4mllm.data.base import load_image
from sam4mllm.labels import generate_labels, label_stats, ppg_label, pqpp_label, sample_box_points
from sam4mllm.sam.base import Prediction, Prompts, Segmenter
from sam4mllm.shards import read_shard, shard_path

ROOT = Path(__file__).resolve().parents[1]


class NegativeParitySegmenter(Segmenter):
    """Returns the GT mask when a group's negative point has an even x, else the box: IoU is known."""

    name = "parity"

    def __init__(self, gt: np.ndarray) -> None:
        super().__init__()
        self.gt, self.batches = gt, []

    def _embed(self, image: np.ndarray) -> None:
        pass

    def _predict(self, prompts: Prompts) -> Prediction:
        self.batches.append(len(prompts))
        out = []
        for box, pts in zip(prompts.boxes, prompts.points, strict=True):
            m = np.zeros_like(self.gt)
            x1, y1, x2, y2 = box.astype(int)
            m[y1:y2, x1:x2] = True
            out.append(self.gt if pts[-1, 0] % 2 == 0 else m)
        return Prediction(np.array(out), np.ones(len(out)))


def _disc(h=40, w=50):
    yy, xx = np.mgrid[:h, :w]
    return (xx - 25) ** 2 + (yy - 20) ** 2 <= 12**2, np.array([13.0, 8.0, 38.0, 33.0])


def test_ppg_label_samples_groups_filters_top_k_and_picks_randomly():
    gt, box = _disc()
    seg = NegativeParitySegmenter(gt)
    seg.set_image(np.zeros((40, 50, 3), np.uint8))
    picks = set()
    for seed in range(12):
        lab = ppg_label(seg, gt, box, np.random.default_rng(seed), n_groups=64, top_k=16)
        pts = np.array(lab["points"])
        assert lab["labels"] == [1, 1, 0]
        assert all(gt[y, x] for x, y in pts[:2]) and not gt[pts[2, 1], pts[2, 0]]
        assert ((pts >= box[:2]) & (pts < box[2:])).all()        # every point inside the GT box
        assert lab["iou"] == 1.0 and pts[2, 0] % 2 == 0           # picked among the best groups
        picks.add(tuple(pts.ravel()))
    assert seg.batches == [64] * 12          # one batched call of 64 groups per target
    assert len(picks) > 6                    # a random pick among the top 16, not always the same


def test_ppg_without_background_in_the_box_has_no_negative():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    seg = NegativeParitySegmenter(gt)
    seg.set_image(np.zeros((10, 10, 3), np.uint8))
    lab = ppg_label(seg, gt, np.array([2.0, 2.0, 6.0, 6.0]), np.random.default_rng(0), n_groups=4, top_k=2)
    assert lab["labels"] == [1, 1] and lab["n_neg"] == 0
    with pytest.raises(MalformedSampleError, match="no pixel inside its annotated box"):  # a bbox off its mask
        ppg_label(seg, gt, np.array([7.0, 7.0, 9.0, 9.0]), np.random.default_rng(0), n_groups=4, top_k=2)


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_pqpp_label_points_are_in_the_box_and_labelled_by_the_mask(sampling):
    gt, box = _disc()
    lab = pqpp_label(gt, box, np.random.default_rng(0), n_points=10, sampling=sampling)
    pts = np.array(lab["points"])
    assert pts.shape == (10, 2) and ((pts >= box[:2]) & (pts < box[2:])).all()
    assert lab["labels"] == [int(gt[y, x]) for x, y in pts]


def test_poisson_disk_points_spread_wider_than_uniform():
    box, rng = np.array([0.0, 0.0, 60.0, 60.0]), np.random.default_rng(0)

    def min_dist(p):
        d = np.hypot(*(p[:, None] - p[None]).transpose(2, 0, 1))
        return d[~np.eye(len(p), dtype=bool)].min()

    uni = np.mean([min_dist(sample_box_points(box, (60, 60), 10, rng, "uniform")) for _ in range(20)])
    poi = np.mean([min_dist(sample_box_points(box, (60, 60), 10, rng, "poisson")) for _ in range(20)])
    assert poi > 2 * uni


def _cfg(data_dir: Path, out: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="gen_labels", overrides=[
            f"paths.data_dir={data_dir}", f"out_dir={out}", "progress=false", "overlays=0", *extra])


def _data_dir(synthetic) -> Path:
    return synthetic.root.parent


def test_ppg_job_decodes_and_embeds_each_image_once_and_covers_every_sentence(synthetic, tmp_path, monkeypatch):
    from sam4mllm.data import refer
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    decoded = []
    monkeypatch.setattr(refer, "load_image", lambda path, *a: decoded.append(path) or load_image(path, *a))
    seg = GrabCutSegmenter()
    merged = generate_labels(_cfg(_data_dir(synthetic), tmp_path / "once", "+exp=ppg", "split=val"), lambda: seg)
    header, records = read_shard(merged)
    assert header["sam"]["_target_"].endswith("GrabCutSegmenter") and header["variant"] == "ppg"
    assert "shard" not in header
    assert seg.embed_count == len(records) == len(decoded) == len(set(decoded)) == 8
    stats = label_stats(merged)
    ds = refer.ReferDataset(synthetic.root / "refer_seg", "refcoco", "val", synthetic.root / "coco/train2014")
    assert stats["samples"] == len(ds) > 8 and stats["errors"] == 0 and stats["mean_iou"] > 0.9
    # The same labels as when every sentence decodes its image itself.
    plain_load = refer.ReferDataset.load
    monkeypatch.setattr(refer.ReferDataset, "load", lambda self, record, image=None: plain_load(self, record))
    each = generate_labels(_cfg(_data_dir(synthetic), tmp_path / "each", "+exp=ppg", "split=val"))
    assert len(decoded) == 8 + stats["samples"] and each.read_bytes() == merged.read_bytes()


@pytest.mark.parametrize("variant", ["ppg", "pqpp"])
def test_label_overlays_show_the_ground_truth_beside_the_label_and_the_mask_its_points_give(synthetic, tmp_path,
                                                                                          monkeypatch, caplog, variant):
    """Every labelled sentence (GRES: several targets, none) drawn: the GT on the left; on the right the
    label's boxes and points and, for PPG, the segmenter's mask of them, whose IoU is the recorded one."""
    from PIL import Image

    from sam4mllm import labels
    from sam4mllm.metrics import score_sample
    from sam4mllm.viz import display_scale

    drawn = []
    real = labels.overlay
    monkeypatch.setattr(labels, "overlay",
                        lambda image, **kw: drawn.append({**kw, "shape": image.shape}) or real(image, **kw))
    merged = generate_labels(_cfg(_data_dir(synthetic), tmp_path, f"+exp={variant}", "dataset=synthetic_gres",
                                  "split=val", "overlays=1000"))
    sentences = [s for r in read_shard(merged)[1] for s in r["samples"]]
    pngs = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(pngs) == len(sentences) == len(drawn) / 2
    assert {len(s["targets"]) for s in sentences} >= {0, 1, 2}
    for png, label, gt, right in zip(pngs, sentences, drawn[::2], drawn[1::2], strict=True):
        targets = label["targets"]
        assert len(gt["masks"]) == len(targets)
        assert right["boxes"] == [t["box"] for t in targets]
        assert right["points"] == [p for t in targets for p in t["points"]]
        assert right["labels"] == [lb for t in targets for lb in t["labels"]]
        if variant == "pqpp" or not targets:
            assert right["masks"] == []
        else:
            assert [score_sample(m, g).iou for m, g in zip(right["masks"], gt["masks"], strict=True)] == \
                   pytest.approx([t["iou"] for t in targets], abs=1e-9)
        assert Image.open(png).width == 2 * gt["scale"] * gt["shape"][1] + 4  # two panels, a 4-px gap
        assert gt["scale"] == right["scale"] == display_scale(gt["shape"])
    # Run again, the finished job only draws: its picks replace the last run's; one whose image has
    # gone missing since is left out and counted, the others drawn.
    data = tmp_path / "data"
    shutil.copytree(synthetic.root, data / "synthetic")
    (data / "synthetic/coco/train2014" / Path(read_shard(merged)[1][0]["image_path"]).name).unlink()
    with caplog.at_level(logging.WARNING, logger="sam4mllm.labels"):
        generate_labels(_cfg(data, tmp_path, f"+exp={variant}", "dataset=synthetic_gres", "split=val", "overlays=2"))
    assert [p.name for p in (tmp_path / "overlays").glob("*.png")] == [f"{len(sentences) - 1:05d}.png"]
    assert "1 label overlays left out: their images cannot be read any more" in caplog.text


def test_gres_labels_have_one_prompt_set_per_target_and_none_for_no_target(synthetic, tmp_path):
    merged = generate_labels(_cfg(_data_dir(synthetic), tmp_path, "+exp=pqpp", "dataset=synthetic_gres"))
    from sam4mllm.data.refer import ReferDataset

    ds = ReferDataset(synthetic.root / "refer_seg", "grefcoco", "train", synthetic.root / "coco/train2014",
                      "grefs(unc).json", dataset="synthetic_gres")
    n_targets = {s.sample_id: len(s.masks) for s in ds}
    got = {s["sample_id"]: len(s["targets"]) for r in read_shard(merged)[1] for s in r["samples"]}
    assert got == n_targets and 0 in got.values() and max(got.values()) > 1


def test_job_is_deterministic_and_shards_merge_to_the_single_process_output(synthetic, tmp_path):
    data = _data_dir(synthetic)
    one = generate_labels(_cfg(data, tmp_path / "one", "+exp=ppg"))
    again = generate_labels(_cfg(data, tmp_path / "again", "+exp=ppg"))
    assert one.read_bytes() == again.read_bytes()
    results = [generate_labels(_cfg(data, tmp_path / "three", "+exp=ppg", f"shard.index={i}", "shard.count=3"))
               for i in (2, 0, 1)]
    assert results[:2] == [None, None]  # merging waits for the last shard
    assert results[2].read_bytes() == one.read_bytes()


def test_a_resume_on_another_shard_count_labels_each_image_once(synthetic, tmp_path, monkeypatch):
    """Killed on 3 processes (two shards finished, one never started), resumed on 2: only the
    images of the missing shard are labelled, the labels are one process's, and the 3 shards'
    files are removed once merged."""
    import sam4mllm.labels as labels

    data = _data_dir(synthetic)
    one = generate_labels(_cfg(data, tmp_path / "one", "+exp=ppg"))
    labelled: list[str] = []
    real = labels.label_image
    monkeypatch.setattr(labels, "label_image", lambda ds, ids, *a: labelled.append(ids[0]) or real(ds, ids, *a))
    for i in (0, 1):
        generate_labels(_cfg(data, tmp_path / "mixed", "+exp=ppg", f"shard.index={i}", "shard.count=3"))
    first = len(labelled)
    merged = [generate_labels(_cfg(data, tmp_path / "mixed", "+exp=ppg", f"shard.index={i}", "shard.count=2"))
              for i in (0, 1)][1]
    images = len(read_shard(one)[1])
    assert 0 < first < len(labelled) == images  # every image labelled once, in all
    assert merged.read_bytes() == one.read_bytes()
    # The merge removed the superseded files of 3 shards, and kept this count's.
    assert sorted(p.name for p in (tmp_path / "mixed").glob("shard-*")) == [shard_path(tmp_path, i, 2).name
                                                                         for i in (0, 1)]
    # Shards of another configuration (another seed) are neither taken for this one's nor removed.
    generate_labels(_cfg(data, tmp_path / "other", "+exp=ppg", "seed=1", "shard.index=0", "shard.count=3"))
    labelled.clear()
    assert generate_labels(_cfg(data, tmp_path / "other", "+exp=ppg")).read_bytes() == one.read_bytes()
    assert len(labelled) == images
    assert shard_path(tmp_path / "other", 0, 3).exists()


def test_shard_index_comes_from_the_launcher_environment(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert generate_labels(_cfg(_data_dir(synthetic), tmp_path, "+exp=pqpp")) is None
    assert shard_path(tmp_path, 1, 2).exists() and not shard_path(tmp_path, 0, 2).exists()


def test_rerun_with_another_config_refuses_to_mix(synthetic, tmp_path):
    generate_labels(_cfg(_data_dir(synthetic), tmp_path, "+exp=pqpp"))
    with pytest.raises(FileExistsError, match="another configuration"):
        generate_labels(_cfg(_data_dir(synthetic), tmp_path, "+exp=pqpp", "seed=1"))


def test_the_segmenter_is_built_only_when_an_image_is_left_to_label_and_after_the_header_check(synthetic, tmp_path):
    """A rerun of another configuration is refused, and a finished job merged again, without loading SAM."""
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    built = []

    def factory():
        built.append(1)
        return GrabCutSegmenter()

    def unloadable():
        raise RuntimeError("the segmenter was built")

    data = _data_dir(synthetic)
    first = generate_labels(_cfg(data, tmp_path, "+exp=ppg", "split=val"), factory)
    assert built == [1]
    again = generate_labels(_cfg(data, tmp_path, "+exp=ppg", "split=val"), unloadable)
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(FileExistsError, match="another configuration"):
        generate_labels(_cfg(data, tmp_path, "+exp=ppg", "split=val", "labels.top_k=2"), unloadable)
    with pytest.raises(RuntimeError, match="was built"):  # images to label: it is needed
        generate_labels(_cfg(data, tmp_path / "new", "+exp=ppg", "split=val"), unloadable)
    assert generate_labels(_cfg(data, tmp_path / "pqpp", "+exp=pqpp", "split=val"), unloadable).exists()


def test_labels_of_an_edited_dataset_are_not_resumed(synthetic, tmp_path):
    """The header carries the annotation files' hash: moving the data keeps it, editing it does not."""
    import shutil

    from sam4mllm.data.refer import ReferDataset

    data = tmp_path / "data"
    shutil.copytree(synthetic.root, data / "synthetic")

    def ds():
        return ReferDataset(data / "synthetic/refer_seg", "refcoco", "val", data / "synthetic/coco/train2014")

    orig = ReferDataset(synthetic.root / "refer_seg", "refcoco", "val", synthetic.root / "coco/train2014")
    assert ds().fingerprint() == orig.fingerprint()
    generate_labels(_cfg(data, tmp_path / "labels", "+exp=pqpp", "split=val"))
    inst = data / "synthetic/refer_seg/refcoco/instances.json"
    js = json.loads(inst.read_text())
    js["annotations"][0]["segmentation"][0][0] += 1.0  # one polygon vertex moves by a pixel
    inst.write_text(json.dumps(js))
    assert ds().fingerprint() != orig.fingerprint()
    with pytest.raises(FileExistsError, match="another configuration"):
        generate_labels(_cfg(data, tmp_path / "labels", "+exp=pqpp", "split=val"))


def test_unreadable_images_are_counted_the_others_labelled_as_in_a_clean_run_and_a_resume_retries(synthetic,
                                                                                                  tmp_path):
    import shutil

    from PIL import Image

    clean = read_shard(generate_labels(_cfg(_data_dir(synthetic), tmp_path / "clean", "+exp=pqpp", "split=val")))[1]
    data = tmp_path / "data"
    shutil.copytree(synthetic.root, data / "synthetic")
    corrupt, resized = (data / "synthetic/coco/train2014" / Path(r["image_path"]).name for r in clean[:2])
    corrupt.write_bytes(b"not a png")
    Image.new("RGB", (7, 5)).save(resized)
    merged = generate_labels(_cfg(data, tmp_path / "bad", "+exp=pqpp", "split=val"))
    records = read_shard(merged)[1]
    assert [r["error"].split(":")[0] for r in records[:2]] == ["CorruptImageError", "MalformedSampleError"]
    assert label_stats(merged)["errors"] == 2 and [r["key"] for r in records] == [r["key"] for r in clean]
    def strip(rs):
        return [{k: v for k, v in r.items() if k != "image_path"} for r in rs]

    assert strip(records[2:]) == strip(clean[2:])
    for path in (corrupt, resized):  # repaired: a resume labels them as a clean run does
        shutil.copy(synthetic.root / path.relative_to(data / "synthetic"), path)
    assert strip(read_shard(generate_labels(_cfg(data, tmp_path / "bad", "+exp=pqpp", "split=val")))[1]) == strip(clean)


@pytest.mark.parametrize("variant, fault", [("pqpp", "rle of another size"), ("pqpp", "nan vertex"),
                                            ("pqpp", "no bbox"), ("ppg", "box off the mask")])
def test_a_malformed_annotation_leaves_out_its_sentences_only(synthetic, tmp_path, variant, fault):
    """The image's other sentences keep their labels; the left-out ones are listed and counted."""
    import shutil

    from pycocotools import mask as mask_utils

    from sam4mllm.data.refer import ReferDataset

    clean = read_shard(generate_labels(_cfg(_data_dir(synthetic), tmp_path / "clean", f"+exp={variant}",
                                            "split=val")))[1]
    data = tmp_path / "data"
    shutil.copytree(synthetic.root, data / "synthetic")
    ds = ReferDataset(data / "synthetic/refer_seg", "refcoco", "val", data / "synthetic/coco/train2014")
    first = [r for r in ds.records if r["image_id"] == ds.records[0]["image_id"]]
    # The image's last target is labelled last, so the labels drawn before it equal a clean run's.
    bad_ann = first[-1]["ann_ids"][0]
    assert len({r["ann_ids"][0] for r in first}) > 1
    inst = data / "synthetic/refer_seg/refcoco/instances.json"
    js = json.loads(inst.read_text())
    ann = next(a for a in js["annotations"] if a["id"] == bad_ann)
    if fault == "rle of another size":
        rle = mask_utils.encode(np.zeros((first[0]["height"] + 1, first[0]["width"]), np.uint8, order="F"))
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    elif fault == "nan vertex":  # Python's json writes and reads NaN; pycocotools crashed on it
        ann["segmentation"] = [[1.0, 1.0, float("nan"), 5.0, 8.0, 8.0]]
    elif fault == "no bbox":
        del ann["bbox"]
    else:  # a box in the top-left corner, where the object is not: PPG finds no positive point in it
        assert not ds.load(first[-1]).masks[0][:2, :2].any()
        ann["bbox"] = [0, 0, 2, 2]
    inst.write_text(json.dumps(js))

    merged = generate_labels(_cfg(data, tmp_path / "bad", f"+exp={variant}", "split=val"))
    records = read_shard(merged)[1]
    left_out = [r["expression"] for r in first if r["ann_ids"] == [bad_ann]]
    assert [s["expression"] for s in records[0]["skipped"]] == left_out
    assert all(s["error"].startswith("MalformedSampleError") for s in records[0]["skipped"])
    kept = [s for s in clean[0]["samples"] if s["expression"] not in left_out]
    assert records[0]["samples"] == kept and kept
    assert [{k: v for k, v in r.items() if k != "image_path"} for r in records[1:]] == [
        {k: v for k, v in r.items() if k != "image_path"} for r in clean[1:]]
    stats = label_stats(merged)
    assert (stats["errors"], stats["skipped_sentences"]) == (0, len(left_out))
    assert stats["samples"] == sum(len(r["samples"]) for r in clean) - len(left_out)


def test_a_broken_line_inside_a_labels_file_is_an_error_and_a_torn_last_line_only_in_a_shard(tmp_path):
    """Only a kill tears a line, and only the last line of a shard being written: a broken line
    used to end the read there, silently dropping every record that followed."""
    from sam4mllm.shards import write_records

    path = write_records(tmp_path / "labels.jsonl", {"variant": "pqpp"}, [{"index": i} for i in range(3)])
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1] + b'{"index": 1, "samp\n' + lines[3])
    with pytest.raises(ValueError, match="line 3, is not a complete JSON record but more lines follow"):
        read_shard(path)
    path.write_bytes(b"".join(lines[:3]) + lines[3][:5])
    assert read_shard(path, partial=True) == ({"variant": "pqpp"}, [{"index": 0}, {"index": 1}])  # a shard
    with pytest.raises(ValueError, match="ends in a torn line"):  # a merged file is written whole
        read_shard(path)


def test_a_bad_setting_stops_the_job_instead_of_marking_every_image_unreadable(synthetic, tmp_path):
    with pytest.raises(ValueError, match="unknown point sampling 'bogus'"):
        generate_labels(_cfg(_data_dir(synthetic), tmp_path / "out", "+exp=pqpp", "labels.sampling=bogus"))
    fixed = generate_labels(_cfg(_data_dir(synthetic), tmp_path / "out", "+exp=pqpp", "labels.sampling=poisson"))
    clean = generate_labels(_cfg(_data_dir(synthetic), tmp_path / "clean", "+exp=pqpp", "labels.sampling=poisson"))
    assert fixed.read_bytes() == clean.read_bytes() and label_stats(fixed)["errors"] == 0


def test_kill_minus_9_then_resume_gives_the_identical_output(synthetic, tmp_path):
    data = _data_dir(synthetic)
    reference = generate_labels(_cfg(data, tmp_path / "ref", "+exp=ppg")).read_bytes()
    out = tmp_path / "killed"
    cmd = [sys.executable, "scripts/gen_labels.py", "+exp=ppg", f"paths.data_dir={data}", f"out_dir={out}",
           "progress=false", f"paths.output_dir={tmp_path}/hydra"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = shard_path(out, 0, 1)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    # Whether or not the kill landed mid-run, also tear the last line as a kill mid-write would.
    text = shard.read_text()
    lines = text.splitlines(keepends=True)
    shard.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2] if len(lines) > 3 else text[:-5])
    # Resumed as the deepspeed launcher would start it: with --local_rank appended (stripped before Hydra).
    r = subprocess.run([*cmd, "--local_rank=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = out / "labels.jsonl"
    assert merged.read_bytes() == reference
    keys = [json.loads(x)["key"] for x in shard.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys))  # nothing written twice
