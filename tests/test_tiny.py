"""The tiny-model builder's init and image-size options reach the weights and the processor."""

import numpy as np
import pytest
from transformers import AutoModelForImageTextToText

from sam4mllm.models.tiny import TinySpec, build_tiny


def test_init_std_and_vision_pos_std(tmp_path):
    spec = TinySpec(family="qwen3vl", hidden_size=128, intermediate_size=256, init_std=0.1, vision_pos_std=1.0)
    model = AutoModelForImageTextToText.from_pretrained(build_tiny(spec, tmp_path / "m"))
    weights = dict(model.named_parameters())
    for name in ("model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.mlp.linear_fc1.weight"):
        assert weights[name].std().item() == pytest.approx(0.1, rel=0.1), name
    assert weights["model.visual.pos_embed.weight"].std().item() == pytest.approx(1.0, rel=0.1)
    # the default stays the library's 0.02, so existing tiny models are unchanged
    default = AutoModelForImageTextToText.from_pretrained(build_tiny(TinySpec(family="qwen3vl"), tmp_path / "d"))
    assert default.model.visual.pos_embed.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_vision_pos_std_needs_a_position_table():
    with pytest.raises(ValueError, match="no learned position table"):
        TinySpec(family="qwen2vl", vision_pos_std=1.0)


def test_min_image_pixels_upscales_a_small_image_to_a_finer_token_grid(tmp_path):
    from transformers import AutoProcessor

    image = np.zeros((100, 100, 3), np.uint8)
    grids = {}
    for name, spec in {"default": TinySpec(family="qwen3vl", image_pixels=128 * 128),
                       "finer": TinySpec(family="qwen3vl", image_pixels=192 * 192, min_image_pixels=192 * 192)}.items():
        ip = AutoProcessor.from_pretrained(build_tiny(spec, tmp_path / name)).image_processor
        grids[name] = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    # 16-px patches, merged 2x2 into one LLM token: 96 px -> 3x3 tokens, 192 px -> 6x6
    assert grids == {"default": [1, 6, 6], "finer": [1, 12, 12]}


def test_a_changed_dialog_template_rebuilds_a_cached_folder(tmp_path, monkeypatch):
    """The tokenizer is trained on the dialog templates; editing one must not leave a cached
    folder with the old tokenizer (and so a silently different model) in place."""
    from sam4mllm import dialogs
    from sam4mllm.models.tiny import corpus_digest

    spec = TinySpec(family="qwen2vl")
    folder = build_tiny(spec, tmp_path / "m")
    before = (folder / "tokenizer.json").read_text(), spec.digest()
    monkeypatch.setattr(dialogs, "POINT_PROMPT", "Does the object with coordinates {box} cover this point? {point}")
    corpus_digest.cache_clear()
    try:
        after = (build_tiny(spec, folder) / "tokenizer.json").read_text(), spec.digest()
    finally:
        corpus_digest.cache_clear()  # other tests see the real templates again
    assert after[1] != before[1]
    assert after[0] != before[0]
