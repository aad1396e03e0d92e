import hashlib
import json
import os
import pickle
import shutil
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sam4mllm.data import CorruptImageError, DatasetNotFoundError, MalformedSampleError
from sam4mllm.data.masks import coco_box, decode_segmentation, encode_rle, encode_uncompressed_rle
from sam4mllm.data.reasonseg import ReasonSegDataset, rasterize_shapes
from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import FORMAT_VERSION, SyntheticConfig, generate_synthetic
from sam4mllm.data.unpickle import UnsafePickleError, load_plain_pickle
from sam4mllm.data.vqa import VQADataset


def refer(root: Path, name="refcoco", split="val", refs_file="refs(unc).p", image_dir=None):
    return ReferDataset(root / "refer_seg", name, split, image_dir or root / "coco" / "train2014", refs_file)


# ------------------------------------------------------------------ restricted unpickler
class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sam4mllm_pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    Path("/tmp/sam4mllm_pwned").unlink(missing_ok=True)
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([{"ref_id": 1, "x": Exploit()}], protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_plain_pickle(p)
    assert not Path("/tmp/sam4mllm_pwned").exists()


def test_restricted_unpickler_admits_plain_containers(tmp_path):
    data = [{"a": (1, 2.5, None, True), "b": ["x", b"y"], "c": {3, 4}, "d": frozenset({5})}]
    for proto in (0, 2, 5):
        p = tmp_path / f"p{proto}.p"
        p.write_bytes(pickle.dumps(data, protocol=proto))
        assert load_plain_pickle(p) == data


# ------------------------------------------------------------------------------ masks
def test_rle_encodings_roundtrip():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (12, 3)]:
        for m in (rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)):
            assert np.array_equal(decode_segmentation(encode_rle(m), *shape), m)
            assert np.array_equal(decode_segmentation(encode_uncompressed_rle(m), *shape), m)


@pytest.mark.parametrize("segm", [[], [[1, 2, 3]], [[1, 2, 3, 4, 5]], {"counts": "x"}, "poly", 3])
def test_malformed_segmentation_raises(segm):
    with pytest.raises(ValueError):
        decode_segmentation(segm, 4, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e8, -1e8])
def test_a_polygon_vertex_that_would_crash_the_rasteriser_raises(bad):
    """pycocotools segfaulted, or was killed for memory, on such a vertex (measured: NaN, inf, 1e8)."""
    with pytest.raises(ValueError, match=r"finite|outside"):
        decode_segmentation([[1.0, 1.0, bad, 5.0, 8.0, 8.0]], 20, 20)
    with pytest.raises(ValueError, match=r"finite|outside"):
        rasterize_shapes([{"label": "target", "points": [[1.0, 1.0], [bad, 5.0], [8.0, 8.0]]}], 20, 20)


@pytest.mark.parametrize("bad", [{}, [2], "x"])
def test_a_polygon_vertex_that_is_not_a_number_is_malformed_data(bad):
    """A ValueError, which the loaders turn into MalformedSampleError; a dict raised TypeError."""
    with pytest.raises(ValueError, match="not a number"):
        decode_segmentation([[1.0, 1.0, bad, 5.0, 8.0, 8.0]], 20, 20)


def test_a_polygon_vertex_a_little_outside_the_image_is_clipped():
    assert decode_segmentation([[-15.0, -15.0, 35.0, -15.0, 35.0, 35.0, -15.0, 35.0]], 20, 20).all()


@pytest.mark.parametrize("counts", [[-5, 405], [5, 10], [5, 394.5]])
def test_uncompressed_rle_counts_must_cover_the_image(counts):
    with pytest.raises(ValueError, match="uncompressed RLE"):
        decode_segmentation({"size": [20, 20], "counts": counts}, 20, 20)


def test_coco_box_is_xyxy_and_a_broken_bbox_raises():
    assert coco_box({"bbox": [2, 3.5, 10, 0]}) == [2.0, 3.5, 12.0, 3.5]
    for bad in ({}, {"bbox": [1, 2, 3]}, {"bbox": [1, 2, float("nan"), 4]}, {"bbox": [1, 2, -3, 4]},
                {"bbox": ["1", 2, 3, 4]}, {"bbox": [1, 2, True, 4]}):
        with pytest.raises(ValueError, match="bbox must be"):
            coco_box(bad)


def test_rle_size_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation(encode_rle(np.ones((3, 3), bool)), 4, 4)


# ---------------------------------------------------------------- synthetic round trip
def test_synthetic_refer_masks_roundtrip_exactly(synthetic):
    root = synthetic.root
    seen_ids = set()
    for split in ("train", "val", "testA", "testB"):
        ds = refer(root, split=split)
        assert len(ds) > 0 and not ds.skipped
        for s in ds:
            objects = synthetic.scenes[s.image_id].objects
            assert len(s.masks) == 1 and s.expression
            assert any(np.array_equal(s.masks[0], o.mask) for o in objects)
            assert np.array_equal(s.image, synthetic.scenes[s.image_id].image)
            seen_ids.add(s.image_id)
    encodings = json.loads((root / "refer_seg/refcoco/instances.json").read_text())["annotations"]
    kinds = {type(a["segmentation"]).__name__ + (type(a["segmentation"].get("counts")).__name__
             if isinstance(a["segmentation"], dict) else "") for a in encodings}
    assert kinds == {"list", "dictstr", "dictlist"}  # polygons, compressed and raw RLE all exercised


def test_synthetic_expression_kinds_take_turns(synthetic):
    # Relative phrases outnumber the others combinatorially; drawn uniformly they were ~90%.
    def kind(expr: str) -> str:
        if any(f" {w} the " in expr for w in ("left of", "right of", "above", "below")):
            return "relative"
        return "absolute" if any(w in expr for w in ("on the", "at the")) else "attribute"

    texts = [s.expression for split in ("train", "val") for s in refer(synthetic.root, split=split)]
    shares = {k: sum(kind(t) == k for t in texts) / len(texts) for k in ("attribute", "absolute", "relative")}
    assert all(0.15 < v < 0.5 for v in shares.values()), shares


def test_synthetic_gres_has_multi_and_no_target(synthetic):
    ds = refer(synthetic.root, name="grefcoco", split="train", refs_file="grefs(unc).json")
    samples = list(ds)
    assert any(s.no_target for s in samples) and any(len(s.masks) > 1 for s in samples)
    for s in samples:
        objects = synthetic.scenes[s.image_id].objects
        for m in s.masks:
            assert any(np.array_equal(m, o.mask) for o in objects)
        assert s.task == "gres" and s.boxes.shape == (len(s.masks), 4)


def test_synthetic_reasonseg_roundtrip_and_ignore(synthetic):
    ds = ReasonSegDataset(synthetic.root / "reason_seg/ReasonSeg", "val")
    assert len(ds) == 8
    n_ignore = 0
    for s in ds:
        scene = synthetic.scenes[f"val/{s.image_id}"]
        assert len(s.masks) == 1
        assert any(np.array_equal(s.masks[0], o.mask) for o in scene.objects)
        assert not (s.masks[0] & s.ignore).any()
        n_ignore += bool(s.ignore.any())
    assert n_ignore > 0


def test_synthetic_vqa(synthetic):
    ds = VQADataset(synthetic.root / "vqav2", "val", synthetic.root / "coco/train2014",
                    image_pattern="COCO_train2014_{image_id:012d}.png")
    s = ds[0]
    assert len(s.answers) == 10 and s.task == "vqa" and not s.no_target
    assert np.array_equal(s.image, synthetic.scenes[s.image_id].image)


def test_vqa_malformed_entries_are_counted(tmp_path, synthetic):
    root = tmp_path / "vqav2"
    shutil.copytree(synthetic.root / "vqav2", root)
    q_path, a_path = root / "v2_OpenEnded_mscoco_val_questions.json", root / "v2_mscoco_val_annotations.json"
    qs, anns = json.loads(q_path.read_text()), json.loads(a_path.read_text())
    del qs["questions"][0]["question"]
    qs["questions"][1]["image_id"] = "twelve"
    anns["annotations"][2]["answers"] = []
    q_path.write_text(json.dumps(qs))
    a_path.write_text(json.dumps(anns))
    ds = VQADataset(root, "val", synthetic.root / "coco/train2014", image_pattern="COCO_train2014_{image_id:012d}.png")
    assert ds.skipped == {"question without a valid annotation": 2, "no human answers": 1}
    assert len(ds) == len(qs["questions"]) - 3


def test_synthetic_is_deterministic_and_split_independent(tmp_path, synthetic):
    from tests.conftest import SMALL

    again = generate_synthetic(tmp_path / "a", SMALL)
    for name in ("refer_seg/refcoco/refs(unc).p", "refer_seg/grefcoco/grefs(unc).json",
                 "refer_seg/refcoco/instances.json", "vqav2/v2_mscoco_val_annotations.json"):
        assert (again.root / name).read_bytes() == (synthetic.root / name).read_bytes()
    # Changing the train size leaves the first val image untouched.
    other = SyntheticConfig(**{**SMALL.__dict__, "images": {**SMALL.images, "train": 3}})
    smaller = generate_synthetic(tmp_path / "b", other)
    first_val = lambda rep: refer(rep.root, split="val")[0].image  # noqa: E731
    assert np.array_equal(first_val(smaller), first_val(synthetic))


def test_regenerating_with_another_config_refuses(tmp_path):
    cfg = SyntheticConfig(images={"val": 1}, reason_images={})
    generate_synthetic(tmp_path / "s", cfg)
    generate_synthetic(tmp_path / "s", cfg)  # same config: fine
    with pytest.raises(FileExistsError, match="another config"):
        generate_synthetic(tmp_path / "s", SyntheticConfig(seed=9, images={"val": 1}, reason_images={}))


def test_synthetic_object_radius(tmp_path):
    """``radius`` scales the shapes; the default keeps the digest of benchmarks made before it."""
    def mean_area(cfg):
        rep = generate_synthetic(tmp_path / cfg.digest(), cfg)
        inst = json.loads((rep.root / "refer_seg/refcoco/instances.json").read_text())["annotations"]
        return np.mean([a["area"] for a in inst]) / (cfg.width * cfg.height)

    base = dict(images={"val": 6}, reason_images={}, min_objects=1, max_objects=1)
    small, big = SyntheticConfig(**base), SyntheticConfig(**base, radius={"small": 0.18, "big": 0.3})
    assert mean_area(big) / mean_area(small) == pytest.approx(4.0, rel=0.2)  # area goes with radius squared
    before = {k: v for k, v in asdict(small).items() if k not in ("radius", "occluder")}  # as before the fields
    blob = json.dumps({"v": FORMAT_VERSION, **before}, sort_keys=True).encode()
    assert small.digest() == hashlib.sha256(blob).hexdigest()[:16] != big.digest()
    with pytest.raises(ValueError, match="radius"):
        SyntheticConfig(radius={"small": 0.1})


def test_occluders_hide_part_of_each_object_and_leave_its_box_short_of_its_mask(tmp_path):
    """``occluder``: a grey disc over each refer object's outline, inside its box. Annotations
    hold exactly the visible pixels, the GT box alone no longer gives the mask, GT-answered
    points recover it, and a benchmark without occluders is unchanged."""
    from sam4mllm.data.synthetic import COLORS, OCCLUDER
    from sam4mllm.inference import PQPPConfig, sample_points
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    base = dict(width=100, height=100, images={"val": 12}, reason_images={}, min_objects=1, max_objects=1,
                radius={"small": 0.15, "big": 0.2})
    plain = generate_synthetic(tmp_path / "plain", SyntheticConfig(**base))
    occluded = generate_synthetic(tmp_path / "occluded", SyntheticConfig(**base, occluder=0.5))
    seg, iou = GrabCutSegmenter(), lambda a, b: (a & b).sum() / (a | b).sum()
    box_only, with_points = [], []
    for s in refer(occluded.root):
        (o,), (whole,) = occluded.scenes[s.image_id].objects, plain.scenes[s.image_id].objects
        grey = (s.image == OCCLUDER).all(-1)
        assert np.array_equal(s.masks[0], (s.image == COLORS[o.color]).all(-1))  # exactly what is visible
        assert np.array_equal(s.image[~grey], plain.scenes[s.image_id].image[~grey])  # the same scene around it
        assert 0 < (grey & whole.mask).sum() < whole.mask.sum() and not (grey & s.masks[0]).any()
        seg.set_image(s.image)
        box_only.append(iou(seg.predict(s.boxes).masks[0], s.masks[0]))
        pts = sample_points(s.boxes[0], s.size, PQPPConfig(), np.random.default_rng(0))
        answers = s.masks[0][pts[:, 1], pts[:, 0]].astype(np.int64)
        with_points.append(iou(seg.predict(s.boxes, pts[None].astype(float), answers[None]).masks[0], s.masks[0]))
    # measured: 0.775 and 0.992
    assert np.mean(box_only) < 0.9 and np.mean(with_points) > 0.97
    assert SyntheticConfig(**base).digest() != SyntheticConfig(**base, occluder=0.5).digest()
    with pytest.raises(ValueError, match="occluder"):
        SyntheticConfig(occluder=1.5)


# ---------------------------------------------------------------- bad and missing data
def test_missing_dataset_names_path_layout_and_command(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        refer(tmp_path, name="refcocog", refs_file="refs(umd).p")
    msg = str(err.value)
    assert str(tmp_path / "refer_seg/refcocog/refs(umd).p") in msg
    assert "instances.json" in msg and "python scripts/prepare_data.py dataset=refcocog" in msg


def test_partial_dataset_names_the_missing_piece(tmp_path, synthetic):
    root = tmp_path / "copy"
    shutil.copytree(synthetic.root / "refer_seg", root / "refer_seg")
    with pytest.raises(DatasetNotFoundError, match="train2014"):
        refer(root)
    (root / "coco/train2014").mkdir(parents=True)
    (root / "refer_seg/refcoco/instances.json").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"instances\.json"):
        refer(root)


def test_unknown_split_lists_the_real_ones(synthetic):
    with pytest.raises(ValueError, match="testB"):
        refer(synthetic.root, split="test")


def test_malformed_refs_are_counted_not_dropped_silently(tmp_path, synthetic):
    root = tmp_path / "bad"
    shutil.copytree(synthetic.root, root)
    refs_path = root / "refer_seg/refcoco/refs(unc).p"
    refs = load_plain_pickle(refs_path)
    val = [r for r in refs if r["split"] == "val"]
    n_sent = [len(r["sentences"]) for r in val]
    val[0]["ann_id"] = 10**9                      # annotation not in instances.json
    val[1]["sentences"][0]["sent"] = "   "        # empty sentence
    del val[2]["image_id"]                        # malformed ref
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    inst_path = root / "refer_seg/refcoco/instances.json"
    inst = json.loads(inst_path.read_text())
    bad_ann = next(a for a in inst["annotations"] if a["id"] == val[3]["ann_id"])
    bad_ann["segmentation"] = [[1, 2, 3]]         # a polygon of 1.5 points
    inst_path.write_text(json.dumps(inst))

    ds = refer(root)
    assert ds.skipped == {
        "annotation missing from instances.json": n_sent[0],
        "empty sentence": 1,
        "malformed ref": n_sent[2],
        "malformed segmentation": n_sent[3],
    }
    total = sum(len(r["sentences"]) for r in val)
    assert len(ds) + sum(ds.skipped.values()) == total


def test_corrupt_and_missing_images_raise_clearly(tmp_path, synthetic):
    root = tmp_path / "img"
    shutil.copytree(synthetic.root, root)
    ds = refer(root)
    path = ds.records[0]["image_path"]
    path.write_bytes(b"not a png")
    with pytest.raises(CorruptImageError, match=str(path)):
        ds[0]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        ds[0]
    Image.new("RGB", (7, 5)).save(path)
    with pytest.raises(MalformedSampleError, match=r"is 7x5 but instances\.json says"):
        ds[0]
    # A PNG whose header claims 30000x30000 pixels: PIL refuses it as a decompression bomb.
    png = bytearray(path.read_bytes())
    png[16:24] = struct.pack(">II", 30000, 30000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))
    with pytest.raises(CorruptImageError, match="decompression bomb"):
        ds[0]
    # An RLE of another size passes the structural check at indexing; decoding finds it.
    target = next(r for r in ds.records if r["ann_ids"] and r["image_path"] != path)
    inst_path = root / "refer_seg" / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    ann = next(a for a in inst["annotations"] if a["id"] == target["ann_ids"][0])
    ann["segmentation"] = encode_rle(np.ones((3, 4), bool))
    inst_path.write_text(json.dumps(inst))
    ds = refer(root)
    i = next(i for i, r in enumerate(ds.records) if r["ann_ids"] == target["ann_ids"])
    with pytest.raises(MalformedSampleError, match="does not match image size"):
        ds[i]


def test_reasonseg_convention_smaller_shapes_win_and_flag_is_skipped():
    big = {"label": "target", "points": [[0, 0], [9, 0], [9, 9], [0, 9]]}
    small = {"label": "ignore me", "points": [[2, 2], [4, 2], [4, 4], [2, 4]]}
    flag = {"label": "flag", "points": [[0, 0], [9, 0], [9, 9]]}
    # Listed small first: painting must still go largest -> smallest, so "ignore" survives.
    target, ignore = rasterize_shapes([small, flag, big], 12, 12)
    assert ignore[2:5, 2:5].all() and ignore.sum() == 9
    assert target.sum() == 100 - 9 and not target[10:, :].any()


def test_reasonseg_reads_its_images_turned_by_their_exif_orientation_as_labelme_drew_on_them(tmp_path):
    """A photo stored sideways with an EXIF orientation tag: labelme's polygons, and LISA's
    cv2.imread, are in the turned frame; read in the stored one, the mask would miss the object."""
    shown = np.zeros((60, 100, 3), np.uint8)
    shown[20:50, 10:40] = 255  # the object, where the viewer shows it
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    (tmp_path / "val").mkdir()
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "val/p.jpg", exif=exif, quality=95)
    square = [[10, 20], [39, 20], [39, 49], [10, 49]]
    (tmp_path / "val/p.json").write_text(json.dumps({"text": ["the white square"], "is_sentence": False,
                                                     "shapes": [{"label": "target", "points": square}]}))
    ds = ReasonSegDataset(tmp_path, "val")
    sample = ds[0]
    assert sample.image.shape == shown.shape
    assert np.abs(sample.image.astype(int) - shown).max() < 16  # JPEG's error only
    assert np.abs(sample.image.astype(int) - cv2.imread(str(tmp_path / "val/p.jpg"))[..., ::-1]).max() <= 2
    [mask] = sample.masks
    assert np.array_equal(mask, shown[..., 0] > 0)
    # Its outputs (labels, predictions) are not resumed from those of the stored frame's reading.
    turned = ds.fingerprint()
    ds.exif_orientation = False
    assert ds.fingerprint() != turned


def test_reasonseg_malformed_json_and_shapes_are_counted(tmp_path, synthetic):
    root = tmp_path / "rs"
    shutil.copytree(synthetic.root / "reason_seg/ReasonSeg", root)
    jsons = sorted((root / "val").glob("*.json"))
    jsons[0].write_text("{not json")
    jsons[1].with_suffix(".jpg").unlink()
    ann = json.loads(jsons[2].read_text())
    ann["shapes"][0]["points"][1] = [3]  # would only fail when painted, mid-evaluation
    jsons[2].write_text(json.dumps(ann))
    ann = json.loads(jsons[3].read_text())
    ann["shapes"][0]["points"][1] = [float("nan"), 3.0]  # Python's json reads and writes NaN
    jsons[3].write_text(json.dumps(ann))
    ds = ReasonSegDataset(root, "val")
    assert ds.skipped == {"malformed json": 1, "image missing": 1, "malformed shape": 1}
    assert len(ds) == len(jsons) - 3
    with pytest.raises(MalformedSampleError, match="not a finite number"):  # a counted error, not a crash
        ds.load(next(r for r in ds.records if r["json_path"] == jsons[3]))
