"""Segmenter interface and backends: batched API == upstream predictor prompt by prompt."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from sam4mllm.data.refer import ReferDataset
from sam4mllm.metrics import score_sample
from sam4mllm.sam.base import CheckpointNotFoundError, Prompts
from sam4mllm.sam.grabcut import GrabCutSegmenter
from sam4mllm.sam.sam_family import HFSamSegmenter, build_efficientvit_sam, build_segment_anything, load_weights

TINY_ENCODER = {"embed_dim": 96, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def _prompts(rng, b, h, w):
    boxes = np.sort(rng.random((b, 2, 2)) * [w, h], axis=1).reshape(b, 4)
    pts = rng.random((b, 3, 2)) * [w, h]
    lab = np.tile([1, 1, 0], (b, 1))
    lab[1, 2] = -1  # prompts with fewer points are padded with label -1
    lab[3, 1:] = -1
    return boxes, pts, lab


def _tiny_hf():
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    cfg = SamConfig(vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "global_attn_indexes": [1], "mlp_dim": 64})
    return SamModel(cfg), SamProcessor(SamImageProcessor())


def _upstream_sam_predictor(seg, box, pts, lab):
    masks, scores, _ = seg.predictor.predict(point_coords=pts, point_labels=lab, box=box, multimask_output=True)
    return masks[scores.argmax()], scores.max()


def _upstream_hf(model, proc, image, box, pts, lab):
    inp = proc(images=image, input_boxes=[[box.tolist()]], input_points=[[pts.tolist()]],
               input_labels=[[lab.tolist()]], return_tensors="pt")
    with torch.no_grad():
        out = model(**inp, multimask_output=True)
    masks = proc.image_processor.post_process_masks(out.pred_masks, inp["original_sizes"],
                                                    inp["reshaped_input_sizes"])[0][0]
    j = int(out.iou_scores[0, 0].argmax())
    return masks[j].numpy(), float(out.iou_scores[0, 0, j])


@pytest.mark.parametrize("backend", ["segment_anything", "efficientvit_l0", "hf_sam"])
def test_batched_equals_upstream_prompt_by_prompt(backend):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    image = (rng.random((90, 130, 3)) * 255).astype(np.uint8)
    if backend == "segment_anything":
        seg = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY_ENCODER)
        upstream = lambda b, p, lab: _upstream_sam_predictor(seg, b, p, lab)  # noqa: E731
    elif backend == "efficientvit_l0":
        seg = build_efficientvit_sam("l0", allow_random_init=True)
        upstream = lambda b, p, lab: _upstream_sam_predictor(seg, b, p, lab)  # noqa: E731
    else:
        model, proc = _tiny_hf()
        seg = HFSamSegmenter(model, proc)
        upstream = lambda b, p, lab: _upstream_hf(model, proc, image, b, p, lab)  # noqa: E731
    seg.set_image(image)
    boxes, pts, lab = _prompts(rng, 5, 90, 130)
    pred = seg.predict(boxes, pts, lab)
    assert pred.masks.shape == (5, 90, 130)
    for i in range(5):
        keep = lab[i] >= 0
        mask, score = upstream(boxes[i], pts[i][keep], lab[i][keep])
        assert np.array_equal(pred.masks[i], mask), f"prompt {i}"
        assert pred.scores[i] == pytest.approx(score, abs=1e-5)


def test_image_embedding_is_cached():
    seg = build_segment_anything("vit_b", allow_random_init=True, encoder=TINY_ENCODER)
    img = np.zeros((32, 48, 3), np.uint8)
    seg.set_image(img)
    seg.set_image(img.copy())  # same content: no new embedding
    assert seg.embed_count == 1
    img[0, 0] = 1
    seg.set_image(img)
    assert seg.embed_count == 2


def test_predict_before_set_image_and_bad_prompts_raise():
    seg = GrabCutSegmenter()
    with pytest.raises(RuntimeError, match="set_image"):
        seg.predict(np.array([[0, 0, 4, 4]]))
    with pytest.raises(ValueError, match="box or points"):
        Prompts.make(None, None, None)
    with pytest.raises(ValueError, match="labels"):
        Prompts.make(None, np.zeros((1, 2, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="real point"):
        Prompts.make(None, np.zeros((1, 1, 2)), -np.ones((1, 1)))
    with pytest.raises(ValueError, match="uint8"):
        seg.set_image(np.zeros((4, 4, 3), np.float32))


def test_missing_checkpoints_name_the_official_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"sam_vit_h_4b8939\.pth") as err:
        build_segment_anything("vit_h", checkpoint=str(tmp_path / "sam_vit_h_4b8939.pth"))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match=r"efficientvit_sam_xl1\.pt"):
        build_efficientvit_sam("xl1", checkpoint=None)
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        HFSamSegmenter.from_pretrained(str(tmp_path / "nope"))


def test_load_weights_is_strict_and_refuses_pickled_code(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save({"weight": torch.ones(2, 2)}, tmp_path / "partial.pt")
    with pytest.raises(KeyError, match="bias"):
        load_weights(net, tmp_path / "partial.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        load_weights(net, tmp_path / "evil.pt")


def test_hf_sam_from_local_folder_matches_the_in_memory_model(tmp_path):
    model, proc = _tiny_hf()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    image = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    boxes, pts, lab = _prompts(rng, 4, 40, 60)
    a, b = HFSamSegmenter(model, proc), HFSamSegmenter.from_pretrained(str(tmp_path))
    for s in (a, b):
        s.set_image(image)
    assert np.array_equal(a.predict(boxes, pts, lab).masks, b.predict(boxes, pts, lab).masks)


def test_grabcut_reaches_iou_09_on_synthetic_with_gt_prompts(synthetic):
    ds = ReferDataset(synthetic.root / "refer_seg", "refcoco", "val", synthetic.root / "coco/train2014")
    seg = GrabCutSegmenter()
    rng = np.random.default_rng(0)
    ious_box, ious_pts = [], []
    for s in ds:
        seg.set_image(s.image)
        gt = s.masks[0]
        ys, xs = np.nonzero(gt)
        pos = rng.choice(len(xs), 2)
        pts = np.array([[[xs[pos[0]], ys[pos[0]]], [xs[pos[1]], ys[pos[1]]]]])
        ious_box.append(score_sample(seg.predict(s.boxes).masks[0], gt).iou)
        ious_pts.append(score_sample(seg.predict(s.boxes, pts, np.ones((1, 2))).masks[0], gt).iou)
    assert np.mean(ious_box) >= 0.9 and np.mean(ious_pts) >= 0.9
    assert min(ious_pts) >= 0.8


def test_grabcut_grows_past_a_box_that_cuts_the_object(synthetic):
    """A learned box is rarely tight: one shrunk by a fifth of the object on one side still gives
    (about) the object, as SAM does, not an empty mask."""
    ds = ReferDataset(synthetic.root / "refer_seg", "refcoco", "val", synthetic.root / "coco/train2014")
    seg = GrabCutSegmenter()
    ious = []
    for s, side in zip(ds, itertools.cycle(range(4))):
        seg.set_image(s.image)
        box = s.boxes[0].copy()
        size = box[2:] - box[:2]
        box[side] += (0.2 if side < 2 else -0.2) * size[side % 2]  # cut into the object from one side
        ious.append(score_sample(seg.predict(box[None]).masks[0], s.masks[0]).iou)
    assert np.mean(ious) >= 0.8 and min(ious) > 0.3


def test_grabcut_is_deterministic_and_needs_a_box():
    rng = np.random.default_rng(0)
    img = np.full((40, 40, 3), 200, np.uint8)
    img[10:25, 12:30] = (200, 30, 30)
    seg = GrabCutSegmenter()
    seg.set_image(img)
    noisy = (img + rng.integers(0, 20, img.shape)).astype(np.uint8)
    seg.set_image(noisy)
    a = seg.predict(np.array([[8, 8, 33, 28]]))
    b = seg.predict(np.array([[8, 8, 33, 28]]))
    assert np.array_equal(a.masks, b.masks)
    gt = np.zeros((40, 40), bool)
    gt[10:25, 12:30] = True
    assert score_sample(a.masks[0], gt).iou > 0.9
    with pytest.raises(ValueError, match="needs a box"):
        seg.predict(None, np.array([[[20, 15], [2, 2]]]), np.array([[1, 0]]))
