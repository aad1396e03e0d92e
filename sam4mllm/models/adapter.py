"""Backbone adapters: everything that differs between MLLM families lives here.

An adapter owns the chat template and image processing (through the model folder's
own processor), the box/point text format and coordinate system, the ``Yes``/``No``
token ids, the LoRA target modules and the vision projector/resampler that trains in
full. Adding a family is one :class:`FamilySpec` entry and one ``model/`` config.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam4mllm.codec import Point, PromptFormat, TargetPrompt, get_format
from sam4mllm.coords import CoordSystem, Grid, ResizedPixels, Size
from sam4mllm.device import resolve_device
from sam4mllm.dialogs import NO, YES, Dialog, shared_stem

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
_LM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass(frozen=True)
class FamilySpec:
    """What a backbone family does differently."""

    prompt_format: str
    coords: str                     # "grid" (0..999) or "resized" (pixels of the resized input)
    assistant_header: str           # text that opens an assistant turn in the chat template
    turn_end: str                   # the single token that closes a turn
    lora_regex: str                 # LLM linear layers that get LoRA
    trainable: tuple[str, ...]      # projector / resampler modules trained in full
    trust_remote_code: bool = False
    auto_model: str = "AutoModelForImageTextToText"  # the transformers Auto classes its checkpoints load with
    auto_processor: str = "AutoProcessor"


FAMILIES: dict[str, FamilySpec] = {
    "qwen2vl": FamilySpec("qwen2vl", "grid", "<|im_start|>assistant\n", "<|im_end|>", _LM_LINEARS,
                          ("model.visual.merger",)),
    "qwen2_5vl": FamilySpec("json", "resized", "<|im_start|>assistant\n", "<|im_end|>", _LM_LINEARS,
                            ("model.visual.merger",)),
    "qwen3vl": FamilySpec("qwen2vl", "grid", "<|im_start|>assistant\n", "<|im_end|>", _LM_LINEARS,
                          ("model.visual.merger", "model.visual.deepstack_merger_list")),
    "llava_next": FamilySpec("official", "grid", "[/INST]", "</s>", _LM_LINEARS, ("model.multi_modal_projector",)),
    # Qwen-VL-Chat v1 (the paper's backbone) exists only as remote code in its model folder.
    "qwenvl": FamilySpec("qwenvl", "grid", "<|im_start|>assistant\n", "<|im_end|>",
                         r"transformer\.h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(w1|w2|c_proj))",
                         ("transformer.visual.attn_pool",), trust_remote_code=True,
                         auto_model="AutoModelForCausalLM", auto_processor="AutoTokenizer"),
}
DYNAMIC_RESOLUTION = frozenset({"qwen2vl", "qwen2_5vl", "qwen3vl"})  # image processors sized by pixel area
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class SampleTooLongError(ValueError):
    """Even the first turn alone exceeds ``max_length``."""


@dataclass
class Encoded:
    """One tokenised dialog: model inputs plus ``labels`` (-100 outside assistant answers)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    dropped_turns: int = 0
    tree: torch.Tensor | None = None  # (2, L): each token's (group, branch), -1 where shared (encode_branched)

    @property
    def length(self) -> int:
        return int(self.labels.shape[-1])


def branch_visibility(group: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``sees[i, j]`` for tokens packed as a tree: ``j <= i`` and ``j`` is shared by all (group -1),
    by ``i``'s group (branch -1), or in ``i``'s own branch. A token's position, as if its branch
    had been asked alone, is the number of tokens it sees, minus one."""
    n = group.shape[-1]
    gi, gj, bi, bj = group[..., :, None], group[..., None, :], branch[..., :, None], branch[..., None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=group.device).tril()
    return causal & ((gj == -1) | ((gj == gi) & ((bj == -1) | (bj == bi))))


class Adapter:
    """Loads a backbone from a local folder and speaks SAM4MLLM dialogs with it.

    Args:
        family: a key of :data:`FAMILIES`.
        path: local model folder (``save_pretrained`` layout); nothing is fetched.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (this rank's GPU if there is one, else the CPU), ``cpu`` or ``cuda:N``.
        trust_remote_code: required (and only honoured) for families that need it;
            off unless the user turns it on.
        max_length: longest tokenised dialog; longer ones lose whole trailing turns.
        prompt_format: overrides the family's box/point text format.
        max_pixels: caps the input image's area for the dynamic-resolution Qwen families
            (Qwen2-VL's released processor allows 12.8 MP, 16k image tokens: far past
            ``max_length``); ``None`` keeps the folder's setting.
        check_processor: called with the loaded processor before the weights load, so that a
            mismatch it raises on (a trained run's image size, say) comes in seconds.
    """

    batch_generation = True  # model_inputs_batch + left-padded generate (the predictor's round 1)
    _check_processor: Callable[[Any], None] | None = None

    def __init__(self, family: str, path: str | Path, dtype: str = "float32", device: str = "auto",
                 trust_remote_code: bool = False, max_length: int = 2048, prompt_format: str | None = None,
                 attn_implementation: str | None = None, max_pixels: int | None = None,
                 check_processor: Callable[[Any], None] | None = None) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}")
        self.family, self.spec, self.max_length = family, FAMILIES[family], max_length
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"{family}: no model folder at {self.path} (expected config.json, weights, tokenizer and processor "
                "files as written by save_pretrained). Download the checkpoint and set model.path=<folder>."
            )
        if self.spec.trust_remote_code and not trust_remote_code:
            raise ValueError(f"{family} runs remote code from {self.path}; set model.trust_remote_code=true "
                             "only if you trust that folder")
        if max_pixels is not None and family not in DYNAMIC_RESOLUTION:
            raise ValueError(f"model.max_pixels applies to {sorted(DYNAMIC_RESOLUTION)}; {family} resizes its "
                             "images to a size of its own")
        self.max_pixels, self._check_processor = max_pixels, check_processor
        self.fmt: PromptFormat = get_format(prompt_format or self.spec.prompt_format)
        self.processor, self.model = self._load(dtype, resolve_device(device), trust_remote_code,
                                                 attn_implementation)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.yes_id, self.no_id = self._single_token(YES), self._single_token(NO)
        self.end_id = self._single_token(self.spec.turn_end)
        self.header_ids = self.tokenizer.encode(self.spec.assistant_header, add_special_tokens=False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        self._glue: tuple[str, str, str] | None = None

    # ----------------------------------------------------------------- loading
    def _load(self, dtype: str, device: torch.device, trust_remote_code: bool, attn: str | None) -> tuple[Any, Any]:
        model_cls, processor_cls = auto_classes(self.family)
        kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        model_kw = {**kw, "dtype": DTYPES[dtype]}
        if attn:
            model_kw["attn_implementation"] = attn
        processor = processor_cls.from_pretrained(self.path, **kw)
        if self.max_pixels is not None:
            # Set on the loaded processor's `size`, the one rule its resize and coord_system both read
            # (a `size` passed to from_pretrained loses to the top-level max_pixels of released folders).
            ip = processor.image_processor
            if ip.size["shortest_edge"] > self.max_pixels:
                raise ValueError(f"model.max_pixels={self.max_pixels} is below the processor's minimum "
                                 f"{ip.size['shortest_edge']} pixels")
            ip.size = replace(ip.size, longest_edge=self.max_pixels)
        if self._check_processor is not None:
            self._check_processor(processor)
        model = model_cls.from_pretrained(self.path, **model_kw).to(device)
        return processor, model

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.family}: {text!r} is {len(ids)} tokens in this tokenizer; it must be one")
        return int(ids[0])

    @property
    def image_token_ids(self) -> frozenset[int]:
        """Ids the processor and model take for image (or video) placeholders."""
        ids = (getattr(self.processor, a, None) for a in ("image_token_id", "video_token_id"))
        return frozenset(i for i in ids if i is not None)

    # ------------------------------------------------------------- coordinates
    def coord_system(self) -> CoordSystem:
        """The integer coordinate system the backbone writes boxes in."""
        if self.spec.coords == "grid":
            return Grid()
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
        return ResizedPixels(resize=lambda hw: smart_resize(hw[0], hw[1], factor, lo, hi))

    def to_model_targets(self, targets: Sequence[dict[str, Any]], size: Size) -> list[TargetPrompt]:
        """Pixel-space labels (``box``, ``points``, ``labels``) -> integer :class:`TargetPrompt` s."""
        cs, out = self.coord_system(), []
        for t in targets:
            box = tuple(int(v) for v in cs.to_model(np.asarray(t["box"], float), size))
            pts = cs.to_model(np.asarray(t.get("points", []), float).reshape(-1, 2), size)
            out.append(TargetPrompt(box, tuple(Point(int(x), int(y), bool(lab))  # type: ignore[arg-type]
                                               for (x, y), lab in zip(pts, t.get("labels", []), strict=True))))
        return out

    # -------------------------------------------------------------- tokenising
    def render(self, dialog: Dialog, with_last_answer: bool = True) -> str:
        """Chat-template text of a dialog (the last answer left open for generation if asked)."""
        msgs = dialog.messages()
        if not with_last_answer:
            msgs = msgs[:-1]
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not with_last_answer)

    def model_inputs(self, text: str, image: np.ndarray) -> dict[str, torch.Tensor]:
        """Processor outputs (ids with image tokens expanded, pixels, grid sizes) for one text + image."""
        return dict(self.processor(text=[text], images=[image], return_tensors="pt"))

    def model_inputs_batch(self, texts: Sequence[str], images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Processor outputs for several texts, one image each, left-padded for batched generation."""
        return dict(self.processor(text=list(texts), images=list(images), padding=True, padding_side="left",
                                   return_tensors="pt"))

    @staticmethod
    def extend_inputs(inputs: dict[str, torch.Tensor], ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """One sample's ``inputs`` with its token ids replaced by ``ids``, which continue them with
        text: the other per-token fields are extended over the new tokens (attended, not image)."""
        n = len(ids) - inputs["input_ids"].shape[1]
        out = dict(inputs, input_ids=torch.tensor([list(ids)], device=inputs["input_ids"].device))
        for k in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
            if k in inputs:
                out[k] = torch.nn.functional.pad(inputs[k], (0, n), value=int(k == "attention_mask"))
        return out

    def answer_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True on assistant answer tokens and their closing token: where the loss falls."""
        ids, h = input_ids.tolist(), self.header_ids
        mask = torch.zeros(len(ids), dtype=torch.bool)
        i = 0
        while i < len(ids):
            if ids[i:i + len(h)] == h:
                j = i + len(h)
                while j < len(ids) and ids[j] != self.end_id:
                    j += 1
                mask[i + len(h):min(j + 1, len(ids))] = True
                i = j
            i += 1
        return mask

    def encode(self, dialog: Dialog, image: np.ndarray) -> Encoded:
        """Tokenise a training dialog; whole trailing turns are dropped to fit ``max_length``."""
        turns = list(dialog.turns)
        for keep in range(len(turns), 0, -1):
            inputs = self.model_inputs(self.render(Dialog(turns[:keep])), image)
            ids = inputs["input_ids"][0]
            if len(ids) <= self.max_length:
                labels = torch.where(self.answer_mask(ids), ids, torch.full_like(ids, IGNORE_INDEX))
                return Encoded(inputs, labels[None], dropped_turns=len(turns) - keep)
        raise SampleTooLongError(f"the first turn alone is {len(ids)} tokens > max_length {self.max_length}")

    def turn_glue(self) -> tuple[str, str, str]:
        """Template text ``(after an answer, before a question, after a question)``, found once."""
        if self._glue is None:
            u, ans, q = "\x00U\x00", "\x00A\x00", "\x00Q\x00"
            head = self.render(Dialog([(u, ans)]))
            full = self.render(Dialog([(u, ans), (q, "")]), with_last_answer=False)
            if not full.startswith(head):
                raise RuntimeError("the chat template does not extend a dialog turn by turn")
            tail = full[len(head):]
            self._glue = (head[head.index(ans) + len(ans):], tail[: tail.index(q)], tail[tail.index(q) + len(q):])
        return self._glue

    def encode_branched(self, first: Dialog, groups: Sequence[Sequence[tuple[str, str]]],
                        image: np.ndarray) -> Encoded:
        """``first`` (answered), then every ``(question, answer)`` turn of each group as its own branch.

        Each question sees ``first``, the text its group's questions share (up to a word
        boundary, encoded once, as the fast predictor does) and itself, at the positions it
        would have if it were asked alone right after ``first``: the loss of one dialog per
        question for a fraction of the tokens, and no earlier answer to lean on (in a
        per-point dialog a later point can be answered from the turns before it). Trailing
        branches that do not fit ``max_length`` are dropped and counted.
        """
        inputs = self.model_inputs(self.render(first), image)
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_length:
            raise SampleTooLongError(f"the first turns alone are {len(ids)} tokens > max_length {self.max_length}")
        group, branch = [-1] * len(ids), [-1] * len(ids)
        _, pre_q, post_q = self.turn_glue()
        n_turns = sum(map(len, groups))
        for g, turns in enumerate(groups):
            questions = [q for q, _ in turns]
            stem = shared_stem(questions)
            tails = [q[len(stem):] + post_q + a + self.spec.turn_end for q, a in turns]
            pieces = self.tokenizer([pre_q + stem + tails[0], pre_q + stem, *tails],
                                    add_special_tokens=False)["input_ids"]
            if pieces[1] + pieces[2] != pieces[0]:  # the tokenizer merges across the seam: share nothing
                pieces = [[], [], *self.tokenizer([pre_q + q + post_q + a + self.spec.turn_end for q, a in turns],
                                                  add_special_tokens=False)["input_ids"]]
            fits = True
            for k, piece in enumerate(pieces[2:]):
                shared = pieces[1] if k == 0 else []  # the group's shared text comes with its first branch
                fits = len(ids) + len(shared) + len(piece) <= self.max_length
                if not fits:
                    break
                ids += shared + piece
                group += [g] * (len(shared) + len(piece))
                branch += [-1] * len(shared) + [k] * len(piece)
            if not fits:
                break
        inputs = self.extend_inputs(inputs, ids)
        t = inputs["input_ids"]
        labels = torch.where(self.answer_mask(t[0]), t[0], torch.full_like(t[0], IGNORE_INDEX))
        kept = len({(g, b) for g, b in zip(group, branch, strict=True) if b >= 0})
        return Encoded(inputs, labels[None], dropped_turns=n_turns - kept, tree=torch.tensor([group, branch]))

    def collate(self, batch_items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad a batch; image tensors are concatenated as the processor lays them out.

        With any :meth:`encode_branched` dialog in it, the attention mask is 4-D (each token
        sees what :func:`branch_visibility` says) and the position ids are given.
        """
        n = max(e.length for e in batch_items)
        out: dict[str, list[torch.Tensor]] = {}
        pad_values = {"input_ids": self.pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
        for e in batch_items:
            fields = {**e.inputs, "labels": e.labels}
            for k, v in fields.items():
                if k in pad_values or k == "labels":
                    fill = IGNORE_INDEX if k == "labels" else pad_values[k]
                    v = torch.nn.functional.pad(v, (0, n - v.shape[-1]), value=fill)
                out.setdefault(k, []).append(v)
        batch = {k: torch.cat(v, 0) for k, v in out.items()}
        if any(e.tree is not None for e in batch_items):
            batch |= self._tree_inputs(batch, [e.tree if e.tree is not None else torch.full((2, e.length), -1)
                                               for e in batch_items])
        return batch

    def _tree_inputs(self, batch: dict[str, torch.Tensor], trees: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The 4-D attention mask and position ids of a batch holding :meth:`encode_branched` dialogs."""
        n = batch["input_ids"].shape[1]
        # padding is a group of its own: it sees the shared tokens and itself, and nothing sees it
        tree = torch.stack([torch.nn.functional.pad(t, (0, n - t.shape[1]), value=-2) for t in trees])
        sees = branch_visibility(tree[:, 0], tree[:, 1])
        logical = sees.sum(-1) - 1
        mask = torch.zeros(sees.shape, dtype=torch.float32).masked_fill_(~sees, torch.finfo(torch.float32).min)
        rope = getattr(getattr(self.model, "model", None), "get_rope_index", None)
        if rope is None:
            return {"attention_mask": mask[:, None], "position_ids": logical}
        # Qwen-VL's 3-D rotary positions: the image's are its own, text after it runs on linearly,
        # so each token moves back by as many places as it sits after its logical position.
        pos, _ = rope(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                      image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch["attention_mask"])
        return {"attention_mask": mask[:, None], "position_ids": pos - (torch.arange(n) - logical)[None]}

    # --------------------------------------------------------------- training
    def trainable_module_names(self) -> list[str]:
        """Full names of the projector/resampler modules present in this model."""
        names = dict(self.model.named_modules())
        return [m for m in self.spec.trainable if m in names]


class QwenVLChatAdapter(Adapter):
    """Qwen-VL-Chat v1 (the paper's main backbone) through the remote code in its model folder.

    Its tokenizer reads images as file paths inside ``<img>...</img>`` (the model opens them
    in its forward), so each image is written, as a PNG named by its digest, to a temporary
    folder of this adapter's own and referenced by path; only the ``KEEP_IMAGES`` most recently
    used stay on disk (a training run would otherwise leave its whole image set there as PNGs
    until it ends). transformers has no native
    implementation and the remote code cannot be fetched here, so this adapter is not
    exercised by the offline tests; it needs ``trust_remote_code=true``.
    """

    IMAGE_PLACEHOLDER = "<|sam4mllm_image|>"
    batch_generation = False  # its remote code's left-padded generation is untested: one sentence at a time
    # Far more than one forward reads: a micro-batch's images are written just before its forward.
    KEEP_IMAGES = 256

    def _load(self, dtype: str, device: torch.device, trust_remote_code: bool, attn: str | None) -> tuple[Any, Any]:
        model_cls, tokenizer_cls = auto_classes(self.family)
        kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        tok = tokenizer_cls.from_pretrained(self.path, **kw)
        if self._check_processor is not None:
            self._check_processor(tok)
        model = model_cls.from_pretrained(self.path, dtype=DTYPES[dtype], **kw).to(device)
        # Not in the model folder, which may be read-only (shared storage) and is copied by merges;
        # removed when the adapter goes, or by the next adapter on this machine if a kill left it.
        self._image_dir = image_folder()
        self._on_disk: OrderedDict[Path, None] = OrderedDict()  # least recently used first
        weakref.finalize(self, shutil.rmtree, self._image_dir, True)
        return tok, model

    def render(self, dialog: Dialog, with_last_answer: bool = True) -> str:
        parts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
        for k, (user, answer) in enumerate(dialog.turns):
            last = k == len(dialog.turns) - 1
            image = f"Picture 1: {self.IMAGE_PLACEHOLDER}\n" if k == 0 else ""
            parts.append(f"<|im_start|>user\n{image}{user}<|im_end|>\n<|im_start|>assistant\n")
            if with_last_answer or not last:
                parts.append(f"{answer}<|im_end|>\n")
        return "".join(parts)

    def model_inputs(self, text: str, image: np.ndarray) -> dict[str, torch.Tensor]:
        from PIL import Image

        from sam4mllm.sam.base import image_digest

        path = self._image_dir / f"{image_digest(image)}.png"
        if path in self._on_disk:
            self._on_disk.move_to_end(path)
        else:
            Image.fromarray(image).save(path)
            self._on_disk[path] = None
            while len(self._on_disk) > self.KEEP_IMAGES:
                self._on_disk.popitem(last=False)[0].unlink(missing_ok=True)
        return dict(self.tokenizer(text.replace(self.IMAGE_PLACEHOLDER, f"<img>{path}</img>"), return_tensors="pt"))


IMAGE_FOLDER_PREFIX = "sam4mllm-qwenvl-images-"


def image_folder(root: str | Path | None = None) -> Path:
    """A new temporary folder for Qwen-VL-Chat's image files, named by host and process id.

    A killed process cannot remove its folder, so the folders of this host's processes that are
    no longer running are removed first (up to :attr:`QwenVLChatAdapter.KEEP_IMAGES` images each).
    """
    root = Path(root or tempfile.gettempdir())
    host = socket.gethostname().replace("-", "_")
    for old in root.glob(f"{IMAGE_FOLDER_PREFIX}{host}-*-*"):
        pid = old.name[len(IMAGE_FOLDER_PREFIX) + len(host) + 1:].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)  # another user's folder stays: not ours to remove
    return Path(tempfile.mkdtemp(prefix=f"{IMAGE_FOLDER_PREFIX}{host}-{os.getpid()}-", dir=root))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def auto_classes(family: str) -> tuple[Any, Any]:
    """The transformers Auto classes that load a family's model and processor (Qwen-VL-Chat: causal LM
    and tokenizer)."""
    import transformers

    spec = FAMILIES[family]
    return getattr(transformers, spec.auto_model), getattr(transformers, spec.auto_processor)


def build_adapter(family: str, path: str, tiny: dict[str, Any] | None = None, **kwargs: Any) -> Adapter:
    """An :class:`Adapter`; with ``tiny`` sizes, the tiny random-init folder at ``path`` is built first."""
    if tiny is not None:
        from sam4mllm.models.tiny import TinySpec, build_tiny

        build_tiny(TinySpec(family=family, **tiny), path)
    cls = QwenVLChatAdapter if family == "qwenvl" else Adapter
    return cls(family, path, **kwargs)
