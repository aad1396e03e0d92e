"""SAM mask-decoder fine-tuning: exclusion of refer val/test images, loss, checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sam4mllm import CONFIG_DIR
from sam4mllm.data.refer import ReferDataset
from sam4mllm.sam.finetune import CocoInstances, evaluation_image_ids, finetune_decoder
from sam4mllm.sam.sam_family import build_segment_anything

TINY = {"embed_dim": 96, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def _cfg(root, tmp_path, *extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="finetune_sam_decoder", overrides=[
            f"coco.instances={root}/refer_seg/refcoco/instances.json", f"coco.image_dir={root}/coco/train2014",
            f"exclude.refer_root={root}/refer_seg", "exclude.datasets=[refcoco,grefcoco]", f"out_dir={tmp_path}",
            "progress=false", *extra])


def test_every_refer_val_and_test_image_is_excluded(synthetic):
    root = synthetic.root
    excluded = evaluation_image_ids(root / "refer_seg", ["refcoco", "grefcoco"])
    held_out = {s.image_id for split in ("val", "testA", "testB")
                for s in ReferDataset(root / "refer_seg", "refcoco", split, root / "coco/train2014")}
    assert held_out and held_out <= excluded
    data = CocoInstances(root / "refer_seg/refcoco/instances.json", root / "coco/train2014", excluded)
    ids = {int(im["id"]) for im in data.images}
    assert not ids & excluded and data.excluded == len(excluded)
    train_ids = {s.image_id for s in ReferDataset(root / "refer_seg", "refcoco", "train", root / "coco/train2014")}
    assert ids == train_ids


def test_missing_exclusion_list_refuses_by_default(synthetic):
    from sam4mllm.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=r"refcoco\+"):
        evaluation_image_ids(synthetic.root / "refer_seg", ["refcoco", "refcoco+"])
    assert evaluation_image_ids(synthetic.root / "refer_seg", ["refcoco", "refcoco+"], require_all=False)


def test_only_the_decoder_trains_the_loss_falls_and_the_checkpoint_loads(synthetic, tmp_path):
    torch.manual_seed(0)
    seg = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY)
    frozen = {k: v.clone() for k, v in seg.model.state_dict().items() if not k.startswith("mask_decoder")}
    ckpt = finetune_decoder(_cfg(synthetic.root, tmp_path, "epochs=2", "lr=3e-4"), seg)
    import json

    losses = json.loads((tmp_path / "train_log.json").read_text())["losses"]
    per_epoch = np.array(losses).reshape(2, -1).mean(1)  # measured: 1.73, 1.11
    assert per_epoch[-1] < 0.7 * per_epoch[0], per_epoch
    for k, v in seg.model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"
    torch.manual_seed(0)
    reloaded = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY, decoder_checkpoint=str(ckpt))
    for k, v in seg.model.mask_decoder.state_dict().items():
        assert torch.equal(v, reloaded.model.mask_decoder.state_dict()[k])
    with pytest.raises(FileExistsError, match="overwrite"):
        finetune_decoder(_cfg(synthetic.root, tmp_path), seg)


def test_a_refused_out_dir_missing_data_or_a_bad_resume_fails_before_sam_loads(synthetic, tmp_path):
    """SAM's checkpoint is missing too: each error must be the job's own, found first."""
    from sam4mllm.data import DatasetNotFoundError
    from sam4mllm.sam.base import CheckpointNotFoundError

    no_sam = ["sam=sam_vit_b", f"sam.checkpoint={tmp_path / 'sam_vit_b_01ec64.pth'}"]
    with pytest.raises(CheckpointNotFoundError):  # for contrast
        finetune_decoder(_cfg(synthetic.root, tmp_path / "a", *no_sam))
    with pytest.raises(DatasetNotFoundError, match="no_coco"):
        finetune_decoder(_cfg(synthetic.root, tmp_path / "b", *no_sam, f"coco.instances={tmp_path / 'no_coco.json'}"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mask_decoder.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        finetune_decoder(_cfg(synthetic.root, tmp_path / "c", *no_sam))
    with pytest.raises(FileNotFoundError, match="resume=true but"):
        finetune_decoder(_cfg(synthetic.root, tmp_path / "d", *no_sam, "resume=true"))
    (tmp_path / "e").mkdir()
    torch.save({"step": 3, "images": 999, "losses": [], "skipped": []}, tmp_path / "e" / "state.pt")
    with pytest.raises(ValueError, match="trained on 999 images"):
        finetune_decoder(_cfg(synthetic.root, tmp_path / "e", *no_sam, "resume=true"))


def test_grabcut_has_no_decoder(synthetic, tmp_path):
    from sam4mllm.sam.grabcut import GrabCutSegmenter

    with pytest.raises(ValueError, match="no SAM mask decoder"):
        finetune_decoder(_cfg(synthetic.root, tmp_path), GrabCutSegmenter())
    # From the config, before COCO's instances file (hundreds of MB) is read: here it is missing.
    for sam, target in (("grabcut", "GrabCutSegmenter"), ("hf_sam", "HFSamSegmenter.from_pretrained")):
        with pytest.raises(ValueError, match=f"{target} has no segment_anything mask decoder"):
            finetune_decoder(_cfg(synthetic.root, tmp_path, f"sam={sam}", f"coco.instances={tmp_path / 'none.json'}"))


def test_a_killed_run_resumes_to_the_uninterrupted_weights(synthetic, tmp_path, monkeypatch):
    import sam4mllm.sam.finetune as ft

    def run(out, *extra):
        torch.manual_seed(0)
        seg = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY)
        finetune_decoder(_cfg(synthetic.root, out, "epochs=2", "lr=3e-4", "save_every=5", *extra), seg)
        return seg.model.mask_decoder.state_dict()

    straight = run(tmp_path / "straight")
    real, calls = ft.decoder_step, []

    def killed_at_12(*args):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt  # as a kill: the last state is step 10's
        return real(*args)

    monkeypatch.setattr(ft, "decoder_step", killed_at_12)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(ft, "decoder_step", real)
    with pytest.raises(FileExistsError, match="resume=true"):
        run(tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 10
    # Another segmenter (its decoder would go on training on other features) or optimisation is refused.
    with pytest.raises(ValueError, match=r"other settings \(sam: .*sam_vit_h_4b8939\.pth.*\); resume with"):
        finetune_decoder(_cfg(synthetic.root, tmp_path / "killed", "epochs=2", "lr=3e-4", "save_every=5",
                              "resume=true", "sam=sam_vit_h"))
    with pytest.raises(ValueError, match=r"other settings \(weight_decay: 0.0 -> 0.1\)"):
        run(tmp_path / "killed", "resume=true", "weight_decay=0.1")
    resumed = run(tmp_path / "killed", "resume=true")
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    import json

    logs = [json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("straight", "killed")]
    assert logs[0] == logs[1] and not (tmp_path / "killed" / "state.pt").exists()


def test_unreadable_images_are_skipped_and_counted(synthetic, tmp_path):
    import json
    import shutil

    from sam4mllm.sam.finetune import CocoInstances

    shutil.copytree(synthetic.root, tmp_path / "data")
    data = CocoInstances(tmp_path / "data/refer_seg/refcoco/instances.json", tmp_path / "data/coco/train2014",
                         evaluation_image_ids(tmp_path / "data/refer_seg", ["refcoco", "grefcoco"]))
    (tmp_path / "data/coco/train2014" / data.images[0]["file_name"]).write_bytes(b"not a png")
    (tmp_path / "data/coco/train2014" / data.images[1]["file_name"]).unlink()
    torch.manual_seed(0)
    seg = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY)
    finetune_decoder(_cfg(tmp_path / "data", tmp_path / "out", "epochs=2"), seg)  # used to crash at a bad image
    log = json.loads((tmp_path / "out/train_log.json").read_text())
    assert sorted(e.split(":")[0] for e in log["skipped"]) == ["CorruptImageError", "FileNotFoundError"]
    assert len(log["losses"]) == 2 * (len(data) - 2)
