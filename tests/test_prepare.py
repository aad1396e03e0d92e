"""``prepare_data``: the library function and the literal script command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.data.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["synthetic.images={train:2,val:3,testA:1,testB:1}", "synthetic.reason_images={train:1,val:2,test:1}"]


def test_synthetic_prepare_counts_match_the_generator(tmp_path, capsys):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="prepare_data", overrides=[
            f"paths.data_dir={tmp_path}", f"overlay_dir={tmp_path}/ov", "overlays=2", *SMALL])
    tables = prepare_data(cfg)
    import json

    manifest = json.loads((tmp_path / "synthetic/synthetic.json").read_text())["counts"]
    by_split = {row[0]: row for row in tables["synthetic"]}
    for split, c in manifest["refcoco"].items():
        assert by_split[split][1] == c["sentences"] and by_split[split][3] == c["images"]
    gres = {row[0]: row for row in tables["synthetic_gres"]}
    assert gres["val"][8] == manifest["grefcoco"]["val"]["no_target"]
    assert len(list((tmp_path / "ov/synthetic").glob("*.png"))) == 2
    assert "| val " in capsys.readouterr().out


def test_checking_real_layout_reports_against_official_counts(tmp_path, capsys):
    """A real-dataset config pointed at a refcoco-shaped folder prints the official column."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        gen = compose(config_name="prepare_data", overrides=[f"paths.data_dir={tmp_path}", "overlays=0", *SMALL])
        prepare_data(gen)
        cfg = compose(config_name="prepare_data", overrides=[
            "dataset=refcoco", f"paths.data_dir={tmp_path}/synthetic"])
    rows = prepare_data(cfg)["refcoco"]
    assert [r[2] for r in rows] == [120624, 10834, 5657, 5095] and {r[5] for r in rows} == {r[6] for r in rows} == {"-"}


def test_prepare_script_missing_data_fails_with_the_fix(tmp_path):
    r = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "dataset=refcocog", f"paths.data_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "refs(umd).p" in r.stderr and "python scripts/prepare_data.py dataset=refcocog" in r.stderr


def test_prepare_script_generates_synthetic(tmp_path):
    r = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
         *SMALL],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "synthetic/refer_seg/refcoco/refs(unc).p").exists()
    assert "synthetic_reasonseg" in r.stdout


def test_check_images_counts_the_corrupt_the_mis_sized_and_the_malformed_annotations(tmp_path, caplog):
    import json

    import numpy as np
    from PIL import Image

    from sam4mllm.data import build_dataset
    from sam4mllm.data.masks import encode_rle

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        prepare_data(compose(config_name="prepare_data", overrides=[f"paths.data_dir={tmp_path}", "overlays=0",
                                                                    *SMALL]))
        cfg = compose(config_name="prepare_data", overrides=[
            "dataset=refcoco", f"paths.data_dir={tmp_path}/synthetic", "check_images=true"])
    ds = build_dataset(cfg.dataset, "val")
    val = ds.image_paths()
    val[0].write_bytes(b"not a png")
    Image.new("RGB", (7, 5)).save(val[1])
    # An RLE of another size on an image that still reads: indexing passes it, decoding does not.
    ann_id = next(r["ann_ids"][0] for r in ds.records if r["image_path"] == val[2])
    inst_path = tmp_path / "synthetic/refer_seg/refcoco/instances.json"
    inst = json.loads(inst_path.read_text())
    next(a for a in inst["annotations"] if a["id"] == ann_id)["segmentation"] = encode_rle(np.ones((3, 4), bool))
    inst_path.write_text(json.dumps(inst))
    n_sentences = sum(ann_id in r["ann_ids"] for r in ds.records)
    rows = {r[0]: r for r in prepare_data(cfg)["refcoco"]}
    assert rows["val"][5] == 2 and rows["train"][5] == 0 and rows["val"][4] == 0
    assert rows["val"][6] == n_sentences > 0 and rows["train"][6] == 0
    assert val[0].name in caplog.text and "is 7x5 but the annotations say" in caplog.text
    assert "does not match image size" in caplog.text


def test_checking_reasonseg_reads_its_images_turned_as_its_loader_does(tmp_path):
    """A photo stored sideways with an EXIF orientation tag, its polygon where the viewer shows the
    object: far outside the stored frame (100 high, 20 wide), inside the turned one."""
    import json

    import numpy as np
    from PIL import Image

    from sam4mllm.data.prepare import _check_split
    from sam4mllm.data.reasonseg import ReasonSegDataset

    (tmp_path / "val").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    Image.fromarray(np.zeros((20, 100, 3), np.uint8)).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "val/p.jpg", exif=exif)
    (tmp_path / "val/p.json").write_text(json.dumps({"text": ["it"], "is_sentence": False, "shapes": [
        {"label": "target", "points": [[80, 5], [95, 5], [95, 15], [80, 15]]}]}))
    assert _check_split(ReasonSegDataset(tmp_path, "val"), "val") == (0, 0)  # (unreadable, malformed)
