"""Tiny random-init backbones built from the real architectures' configs, for CPU tests and the demo.

``build_tiny(family, out_dir, ...)`` writes a complete model folder -- config, random
weights (safetensors), a byte-level BPE tokenizer trained offline on the project's own
dialog text with the family's special tokens, image processor, chat template -- so
that tiny and real checkpoints load through the same ``from_pretrained`` code. The
tokenizer splits digits one by one (as Qwen's does) and keeps ``Yes`` and ``No`` as
single tokens. A folder is rebuilt only when its spec or the tokenizer corpus changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam4mllm import dialogs
from sam4mllm.codec import FORMATS, Point, TargetPrompt
from sam4mllm.data.synthetic import COLOR_RIDDLES, COLORS, NUMBER_WORDS, SHAPE_RIDDLES, SHAPES, SIZES

BUILDER_VERSION = 3  # bump when the builder changes, so cached folders rebuild (the corpus is hashed)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "[INST]", "[/INST]", "<pad>"]

# Chat templates in each family's own layout (written here; real checkpoints bring theirs).
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endif %}{% endfor %}"
)


@dataclass
class TinySpec:
    """Sizes of a tiny backbone; every field feeds the folder's hash."""

    family: str = "qwen2vl"
    vocab_size: int = 1200
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_embed: int = 32
    vision_heads: int = 2
    image_pixels: int = 112 * 112  # max_pixels of the image processor
    # min_pixels (None: two patches square): a smaller image is upscaled to it, so more
    # pixels give a small image a finer token grid (a 100-px image: 3x3 Qwen3-VL tokens).
    min_image_pixels: int | None = None
    # A tiny image is a 4x4 grid of tokens; with the usual theta the low rotary frequencies
    # that multimodal RoPE gives the height/width axes barely turn over 4 positions, and
    # Qwen2-VL's ViT has no absolute position embedding, so the LLM could not tell where
    # an image token sits. A small theta makes those axes visible.
    rope_theta: float = 10000.0
    # Weight init std (the configs' initializer_range). The usual 0.02 suits wide models;
    # the width-128 grounding probes learned faster at 0.08 (docs/cpu_demo_history.md).
    init_std: float = 0.02
    # Std of Qwen3-VL's learned ViT position table (None: init_std). At 0.02 the table is
    # tiny next to the patch content (std about 1), so the LLM barely sees where a token is.
    vision_pos_std: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, not in the builder, so a bad spec fails before the tokenizer is trained.
        if self.vision_pos_std is not None and self.family != "qwen3vl":
            raise ValueError(f"vision_pos_std: {self.family}'s ViT has no learned position table (only qwen3vl has)")

    def digest(self) -> str:
        """Names what the builder would write: the spec, the builder version and the tokenizer corpus.

        The corpus is hashed rather than versioned because it is made from the dialog
        templates, which change in other modules without anyone bumping ``BUILDER_VERSION``.
        """
        blob = {"builder": BUILDER_VERSION, "corpus": corpus_digest(self.seed), **asdict(self)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def tokenizer_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Text the tiny tokenizer is trained on: every dialog template with synthetic content."""
    rng = np.random.default_rng(seed)
    words = list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(SIZES) + list(NUMBER_WORDS)
    words += ["left", "right", "top", "bottom", "above", "below", "all", "the", "of", "on", "at", "shape", "shapes"]
    riddles = [r for rs in SHAPE_RIDDLES.values() for r in rs] + list(COLOR_RIDDLES.values())
    # The chat roles too: the template puts them after a special token, where they are words of their own.
    out = ["Yes", "No", "Yes No", "No object found.", "You are a helpful assistant.", "user", "assistant"] * 50
    for _ in range(n):
        expr = " ".join(rng.choice(words, size=int(rng.integers(2, 7))))
        fmt = FORMATS[str(rng.choice(list(FORMATS)))]
        pts = rng.integers(0, 1000, (3, 3)) % [1000, 1000, 2]
        t = TargetPrompt(tuple(sorted(rng.integers(0, 1000, 4).tolist())),  # type: ignore[arg-type]
                         tuple(Point(int(a), int(b), bool(c)) for a, b, c in pts))
        # the two dialog texts PQPP has (``branch`` asks per_point's), listed so that a new mode leaves the corpus
        task, mode = str(rng.choice(["res", "gres"])), str(rng.choice(["per_point", "joint"]))
        question = f"What color is the {rng.choice(SHAPES)}?"
        out += [dialogs.ppg_dialog(expr, [t], task, fmt).turns[0][0], fmt.encode([t]),
                *(q for q, _ in dialogs.pqpp_dialog(expr, [t], task, fmt, mode).turns),
                str(rng.choice(riddles)), dialogs.vqa_dialog(question, "red").turns[0][0]]
    return out


@functools.cache
def corpus_digest(seed: int = 0) -> str:
    """Hash of :func:`tokenizer_corpus` (about a second to draw, so once per process)."""
    return hashlib.sha256(json.dumps(tokenizer_corpus(seed)).encode()).hexdigest()[:12]


def train_tokenizer(specials: list[str], vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE trained on :func:`tokenizer_corpus`, wrapped as a fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one token per digit, as Qwen does
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    for word in (dialogs.YES, dialogs.NO):
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny tokenizer splits {word!r}; raise vocab_size")
    return fast


def _qwen_family_config(spec: TinySpec, tok: Any) -> Any:
    from transformers import AutoConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = spec.hidden_size // spec.num_heads
    text = {"vocab_size": len(tok), "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": True, "initializer_range": spec.init_std}
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    vision: dict[str, Any] = {"depth": spec.vision_depth, "num_heads": spec.vision_heads, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": spec.init_std}
    common = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if spec.family == "qwen2vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": spec.rope_theta}
        vision |= {"embed_dim": spec.vision_embed, "hidden_size": spec.hidden_size}
        return AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision, **common)
    if spec.family == "qwen2_5vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": spec.rope_theta}
        vision |= {"hidden_size": spec.vision_embed, "out_hidden_size": spec.hidden_size,
                   "intermediate_size": 2 * spec.vision_embed, "fullatt_block_indexes": [spec.vision_depth - 1],
                   "window_size": 56}
        return AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, **common)
    if spec.family == "qwen3vl":
        text |= {"head_dim": head_dim,
                 "rope_parameters": {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True,
                                     "rope_theta": spec.rope_theta}}
        vision = {"depth": spec.vision_depth, "num_heads": spec.vision_heads, "hidden_size": spec.vision_embed,
                  "out_hidden_size": spec.hidden_size, "intermediate_size": 2 * spec.vision_embed,
                  "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "initializer_range": spec.init_std}
        return AutoConfig.for_model("qwen3_vl", text_config=text, vision_config=vision, **common)
    raise ValueError(f"no tiny config for family {spec.family!r}")


def _llava_next_config(spec: TinySpec, tok: Any) -> Any:
    from transformers import AutoConfig

    text = {"model_type": "mistral", "vocab_size": len(tok), "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
            "max_position_embeddings": 4096, "bos_token_id": tok.convert_tokens_to_ids("<s>"),
            "eos_token_id": tok.convert_tokens_to_ids("</s>"), "pad_token_id": tok.convert_tokens_to_ids("<pad>"),
            "initializer_range": spec.init_std}
    vision = {"model_type": "clip_vision_model", "hidden_size": spec.vision_embed,
              "intermediate_size": 2 * spec.vision_embed, "num_hidden_layers": spec.vision_depth,
              "num_attention_heads": spec.vision_heads, "image_size": 56, "patch_size": 14,
              "initializer_range": spec.init_std}
    return AutoConfig.for_model("llava_next", text_config=text, vision_config=vision,
                                image_token_index=tok.convert_tokens_to_ids("<image>"),
                                image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
                                vision_feature_layer=-1, projector_hidden_act="gelu")


def _processor(spec: TinySpec, tok: Any) -> Any:
    if spec.family == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                     image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=LLAVA_TEMPLATE,
                                  vision_feature_select_strategy="default", image_token="<image>",
                                  num_additional_image_tokens=1)  # the CLIP CLS token
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    patch = 16 if spec.family == "qwen3vl" else 14
    size = {"shortest_edge": spec.min_image_pixels or (2 * patch) ** 2, "longest_edge": spec.image_pixels}
    ip = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    if spec.family == "qwen3vl":
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                chat_template=QWEN_TEMPLATE)
    proc_cls = Qwen2VLProcessor if spec.family == "qwen2vl" else Qwen2_5_VLProcessor
    return proc_cls(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                    chat_template=QWEN_TEMPLATE)


def build_tiny(spec: TinySpec, out_dir: str | Path) -> Path:
    """Write (or reuse) the tiny model folder for ``spec`` and return its path."""
    import fcntl

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Under torch.distributed only rank 0 writes (save_pretrained skips other ranks): it
    # builds while the others wait at a barrier. The file lock covers separate jobs.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stamp = out / "tiny_spec.json"
            if not (stamp.exists() and json.loads(stamp.read_text()).get("digest") == spec.digest()):
                _build(spec, out)
    if distributed:
        torch.distributed.barrier()
    return out


def _build(spec: TinySpec, out: Path) -> Path:
    from transformers import AutoModelForImageTextToText

    specials = LLAVA_SPECIALS if spec.family == "llava_next" else QWEN_SPECIALS
    tok = train_tokenizer(specials, spec.vocab_size, spec.seed)
    if spec.family == "llava_next":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
        config = _llava_next_config(spec, tok)
    else:
        tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
        config = _qwen_family_config(spec, tok)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config)
    if spec.vision_pos_std is not None:
        with torch.no_grad():
            model.model.visual.pos_embed.weight.normal_(0.0, spec.vision_pos_std)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _processor(spec, tok).save_pretrained(tmp)
    (tmp / "tiny_spec.json").write_text(json.dumps({"digest": spec.digest(), "spec": asdict(spec)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out

