"""``train(cfg)``: LoRA (or, for tiny models, full) fine-tuning under DeepSpeed or plain PyTorch.

What trains (paper §4.1): peft LoRA on the LLM's linear layers plus the vision
projector/resampler in full; nothing else. Lion, warm-up then a cosine (paper), constant
or warmup-stable-decay schedule, per-device micro-batch with gradient accumulation.
Checkpoints hold the trainable weights, optimizer, scheduler, step, data position, every
rank's RNG state, the config and a hash of the data; a resumed run follows the same loss
curve as an uninterrupted one, and a resume over other data is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import resource
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sam4mllm.atomic import write_atomic
from sam4mllm.config import build
from sam4mllm.data.errors import UNREADABLE
from sam4mllm.device import resolve_device
from sam4mllm.models.adapter import IGNORE_INDEX, SampleTooLongError
from sam4mllm.training.data import Example, build_mixture, examples_digest, label_examples
from sam4mllm.training.distributed import barrier, init_distributed, mean_across_ranks, rank, weights_only_loads, world

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- model
def apply_finetuning(adapter: Any, train_cfg: Any) -> dict[str, int]:
    """Make exactly the intended parameters trainable; return trainable counts per module group."""
    model = adapter.model
    if train_cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=train_cfg.lora.r, lora_alpha=train_cfg.lora.alpha, lora_dropout=train_cfg.lora.dropout,
                          target_modules=adapter.spec.lora_regex, modules_to_save=adapter.trainable_module_names(),
                          bias="none")
        model = get_peft_model(model, lora)
    elif train_cfg.finetune == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"train.finetune must be lora or full, got {train_cfg.finetune!r}")
    if train_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if train_cfg.finetune == "lora":
            model.enable_input_require_grads()
    adapter.model = model
    return trainable_counts(model)


def lr_schedule(opt: torch.optim.Optimizer, name: str, warmup: int, total: int, decay: int = 0) -> Any:
    """Linear warm-up over ``warmup`` steps, then ``cosine`` decay to 0 at ``total`` (the
    paper's), a ``constant`` rate, or ``wsd``: constant, then cosine decay to 0 over the
    last ``decay`` steps."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_wsd_schedule

    if name == "cosine":
        return get_cosine_schedule_with_warmup(opt, warmup, total)
    if name == "constant":
        return get_constant_schedule_with_warmup(opt, warmup)
    if name == "wsd":
        if not 0 <= decay <= total - warmup:
            raise ValueError(f"train.schedule 'wsd' needs 0 <= decay steps <= {total - warmup} (train.decay_ratio), "
                             f"got {decay}")
        return get_wsd_schedule(opt, warmup, decay, total)
    raise ValueError(f"train.schedule must be 'cosine', 'constant' or 'wsd', got {name!r}")


def trainable_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters grouped as ``lora``, ``projector`` (modules_to_save) or ``other``."""
    counts = {"lora": 0, "projector": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "lora" if "lora_" in name else "projector" if "modules_to_save" in name else "other"
            counts[key] += getattr(p, "ds_numel", p.numel())  # a ZeRO-3 shard's numel() is 0
    return counts


# --------------------------------------------------------------------------- recipe
# Settings a checkpoint cannot be resumed under others of: which weights train, their shapes and the base
# they adapt (a moved model.path can change); the optimizer, whose saved state would silently override a
# changed one (the learning rate and weight decay are restored with it); the seed, which orders each
# epoch's draws (the checkpoint's place in its epoch would point into another order); and DeepSpeed on or
# off and its ZeRO stage, which lay out the checkpoint's files.
FIXED_ON_RESUME = ("model.family", "model.tiny", "train.finetune", "train.lora.r", "train.optimizer", "train.seed",
                   "deepspeed.enabled", "deepspeed.zero_optimization.stage")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or inside one (``a.b.c`` is under ``a.b``, ``a.bc`` is not)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` from nested dicts (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class Trainer:
    """One training run: ``setup``, ``train``, ``save_checkpoint``, ``cleanup``."""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(cfg.run_dir)
        self.use_ds = bool(cfg.deepspeed.get("enabled", False))
        self.device = resolve_device(cfg.model.get("device", "auto"))  # where the model trains, as it infers
        self.step = 0            # optimizer steps done
        self.epoch = 0
        self.micro = 0           # micro-batches consumed in the current epoch (this rank)
        self.best_val = math.inf  # the val_loss of the weights in run_dir/best (train.save_best)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        init_distributed(self.use_ds, self.device)
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not self.cfg.resume:
            raise FileExistsError(f"{self.run_dir} exists; set resume=true to continue it or choose another run_dir")
        barrier()
        # The data, its settings and a resume's checkpoint before the model: a missing labels file,
        # a bad data.val or a resume over changed data fails in seconds, not after a 7B has loaded.
        self.data = build_mixture(self.cfg.data.sources, None, self.cfg.variant, self.cfg.pqpp_mode, self.t.seed,
                                  self.cfg.sentences_per_dialog)
        if len(self.data) == 0:  # else a max_steps run would wait forever for its first batch
            sizes = {name: len(examples) for name, (examples, _) in self.data.sources.items()}
            raise ValueError(f"the training mixture draws no example (examples per source switched on: {sizes}); "
                             "a labels file may hold only unreadable images (label_stats counts them)")
        # Accumulation windows may span epochs (as DeepSpeed counts micro-steps), so the
        # total counts micro-batches over all epochs.
        micro_per_epoch = math.ceil(self._rank_len() / self.t.micro_batch_size)
        self.total_steps = self.t.max_steps or self.t.epochs * micro_per_epoch // self.t.grad_accum
        if self.total_steps < 1:
            raise ValueError(f"{len(self.data)} examples give no optimizer step at micro-batch "
                             f"{self.t.micro_batch_size} x accumulation {self.t.grad_accum} x {world()} ranks")
        self.data_digest = self.data.fingerprint()
        val = (self.cfg.data.get("val") or {}) if self.t.val_every else {}
        if self.t.val_every and not val:
            raise ValueError("train.val_every needs data.val: validation label files by name, e.g. "
                             "data.val={refcoco:<outputs>/labels/pqpp/refcoco/val/labels.jsonl}")
        if self.t.save_best and not self.t.val_every:
            raise ValueError("train.save_best keeps the weights of the lowest validation loss: it needs "
                             "train.val_every (and data.val)")
        self.val = {name: label_examples(path, self.cfg.variant, name, leave_out=f"~data.val.{name}")
                    for name, path in val.items()}
        self.val_digest = {name: examples_digest(examples) for name, examples in sorted(self.val.items())}
        resumed, changes = self._resume_point() if self.cfg.resume else (None, [])
        with self._zero3_loading():
            self.adapter = build(self.cfg.model)
        self.data.adapter = self.adapter
        # Seeded after loading: building a tiny model re-seeds the global RNG, so a LoRA
        # init seeded before it depended on whether this process had built or loaded it.
        self._seed(self.t.seed)
        self.counts = apply_finetuning(self.adapter, self.t)
        self._build_optimization()
        if resumed:
            self._load_checkpoint(resumed)
        if rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # The first run's config stays in config.yaml; a resume with changes adds its own.
            name = f"config.resumed-at-{resumed}.yaml" if resumed else "config.yaml"
            if not resumed or changes:
                (self.run_dir / name).write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            if resumed:
                self._trim_log()
            log.info("trainable parameters: %s; %d examples; %d optimizer steps", self.counts, len(self.data),
                     self.total_steps)
        self._wandb = self._init_wandb()

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _rank_len(self) -> int:
        return math.ceil(len(self.data) / world())

    def _build_optimization(self) -> None:
        params = [p for p in self.adapter.model.parameters() if p.requires_grad]
        opt = build(self.t.optimizer)(params)  # _partial_: the params arrive here
        steps = self.total_steps
        sched = lr_schedule(opt, self.t.schedule, math.ceil(self.t.warmup_ratio * steps), steps,
                            round(self.t.decay_ratio * steps))
        model = self.adapter.model
        if self.use_ds:
            import deepspeed

            self.engine, self.opt, _, self.sched = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=self._ds_config())
        else:
            model.to(self.device)
            if world() > 1:
                model = torch.nn.parallel.DistributedDataParallel(model)
            self.engine, self.opt, self.sched = model, opt, sched

    def _ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config with the train config's batch sizes and precision filled in."""
        ds_cfg = OmegaConf.to_container(self.cfg.deepspeed, resolve=True)
        ds_cfg.pop("enabled", None)
        ds_cfg |= {"train_micro_batch_size_per_gpu": self.t.micro_batch_size,
                   "gradient_accumulation_steps": self.t.grad_accum,
                   "fp16": {"enabled": self.t.precision == "fp16"},
                   "bf16": {"enabled": self.t.precision == "bf16"}}
        if self.t.precision == "fp32":
            ds_cfg.pop("fp16"), ds_cfg.pop("bf16")
        return ds_cfg

    @contextlib.contextmanager
    def _zero3_loading(self):
        """Under ZeRO-3, load the backbone straight into each rank's shards (transformers runs
        ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig`` is alive): loaded whole, every card
        would first receive the whole model (a 7B in bf16 is ~16 GB) for DeepSpeed to shard."""
        if not (self.use_ds and OmegaConf.select(self.cfg, "deepspeed.zero_optimization.stage") == 3):
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        tiny = self.cfg.model.get("tiny")
        if tiny is not None:  # written first: a model built under zero.Init would be saved as empty shards
            from sam4mllm.models.tiny import TinySpec, build_tiny

            build_tiny(TinySpec(family=self.cfg.model.family, **tiny), self.cfg.model.path)
        self._hf_ds = HfDeepSpeedConfig(self._ds_config())  # kept: transformers holds a weak reference only
        yield
        model = self.adapter.model
        # transformers' ZeRO-3 loader (5.x) keeps all of the family's key conversions, not only those the
        # checkpoint used as its other loader does; save_pretrained reverses them all, and a full
        # fine-tune's final folder came out with keys like "model.model.layers...", in neither layout.
        if getattr(model, "_weight_conversions", None):
            model._weight_conversions = [c for c in model._weight_conversions if c.was_used()]
        # zero.Init partitions everything, whatever its size; the trainable parameters are made
        # after it and partitioned by deepspeed.initialize.
        params = list(model.parameters())
        held = sum(getattr(p, "ds_tensor", p).numel() for p in params)
        whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        log.info("ZeRO-3 loading: this rank holds %d of the backbone's %d parameters", held, whole)

    # -------------------------------------------------------------- batches
    def _batches(self):
        """This rank's micro-batches of the current epoch (with their token counts), from ``self.micro``."""
        self.data.set_epoch(self.epoch)
        order = list(range(len(self.data)))
        per_rank = self._rank_len()
        order += order[: per_rank * world() - len(order)]  # equal length on every rank
        mine = order[rank()::world()]
        bs = self.t.micro_batch_size
        for start in range(self.micro * bs, len(mine), bs):
            items = [self.data[i] for i in mine[start:start + bs]]
            self.micro += 1
            yield self.adapter.collate(items), sum(e.length for e in items)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.t.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.t.precision == "bf16" else torch.float16
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return self.engine(**batch).loss

    # ----------------------------------------------------------------- train
    def train(self) -> list[dict[str, float]]:
        """Run to ``total_steps``; returns the logged records of this process."""
        history: list[dict[str, float]] = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=rank() != 0 or not self.cfg.progress)
        self.engine.train()
        t0, tokens, window = time.perf_counter(), 0, []
        while self.step < self.total_steps:
            for batch, n_tokens in self._batches():
                loss = self._forward(batch)
                tokens += n_tokens
                window.append(float(loss.detach()))
                if self.use_ds:
                    stepped = self.engine.is_gradient_accumulation_boundary()
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    (loss / self.t.grad_accum).backward()
                    stepped = len(window) == self.t.grad_accum
                    if stepped:
                        torch.nn.utils.clip_grad_norm_([p for p in self.engine.parameters() if p.requires_grad],
                                                       self.t.max_grad_norm)
                        self.opt.step()
                        self.sched.step()
                        self.opt.zero_grad(set_to_none=True)
                if not stepped:
                    continue
                self.step += 1
                loss_mean, tok = mean_across_ranks([float(np.mean(window)), float(tokens)])
                dt = time.perf_counter() - t0
                rec = {"step": self.step, "loss": loss_mean, "lr": float(self.sched.get_last_lr()[0]),
                       "tokens_per_s": tok * world() / dt, "step_s": dt, "peak_mem_mb": peak_memory_mb(self.device),
                       "epoch": self.epoch}
                if self.t.val_every and (self.step % self.t.val_every == 0 or self.step == self.total_steps):
                    rec |= self.validate()
                    if self.t.save_best and rec["val_loss"] < self.best_val:  # before a checkpoint stores it
                        self.best_val = rec["val_loss"]
                        self._save_weights("best")
                        if rank() == 0:
                            log.info("step %d: the lowest val_loss so far, %.4f: weights in %s", self.step,
                                     self.best_val, self.run_dir / "best")
                history.append(rec)
                self._log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                t0, tokens, window = time.perf_counter(), 0, []
                if self.t.save_every and self.step % self.t.save_every == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            else:  # the epoch ran out; an open accumulation window carries on into the next
                self.epoch, self.micro = self.epoch + 1, 0
        bar.close()
        if self.cfg.save_final:
            self.save_checkpoint()
            self._save_weights("final")
        if rank() == 0 and self.data.stats:
            log.info("dialogs cut or replaced: %s", dict(self.data.stats))
        return history

    def validate(self) -> dict[str, float]:
        """Per-token loss on ``data.val`` (labels of held-out splits), by source and overall.

        Dropout off and no gradients. The examples are dealt over the ranks, one per forward (a
        micro-batch's loss would average its sentences together), and the sums all-reduced. Every
        rank runs as many forwards, since ZeRO-3 gathers the weights in each: a rank short of
        examples repeats one without counting it. A dialog longer than ``max_length`` or an
        unreadable image is left out and counted in ``val_skipped``. Nothing here draws from an
        RNG, so training goes on exactly as it would without validation.
        """
        names = sorted(self.val)
        flat = [(k, ex) for k, name in enumerate(names) for ex in self.val[name]]
        mine = flat[rank()::world()]
        sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # per source: loss sum, tokens; then skipped
        filler = None
        self.engine.eval()
        with torch.no_grad():
            for i in tqdm(range(math.ceil(len(flat) / world())), desc="val", leave=False,
                          disable=rank() != 0 or not self.cfg.progress):
                k, ex = mine[i] if i < len(mine) else (None, None)
                enc = self._encode_val(ex) if ex is not None else None
                sums[-1] += ex is not None and enc is None
                if enc is not None:
                    filler = enc
                else:  # a forward all the same (ZeRO-3), not counted
                    k, enc = None, filler or next(filter(None, map(self._encode_val, (e for _, e in flat))), None)
                    if enc is None:
                        raise ValueError(f"no validation example of {names} can be encoded (each is longer than "
                                         "model.max_length or its image is unreadable)")
                loss = self._forward(self.adapter.collate([enc]))
                if k is not None:
                    n = int((enc.labels[..., 1:] != IGNORE_INDEX).sum())  # the tokens the loss averages
                    sums[2 * k] += float(loss) * n
                    sums[2 * k + 1] += n
        self.engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        loss, tokens = sums[:-1].view(-1, 2).T
        out = {"val_loss": float(loss.sum() / tokens.sum()), "val_skipped": int(sums[-1])}
        return out | {f"val_loss/{name}": float(loss[k] / tokens[k]) for k, name in enumerate(names)}

    def _encode_val(self, ex: Example) -> Any:
        """A validation example's training dialog, or ``None`` if it cannot be trained on."""
        try:
            return self.data.encode(ex, ex.image())
        except (SampleTooLongError, *UNREADABLE):
            return None

    def _log(self, rec: dict[str, float]) -> None:
        if rank() != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log(rec, step=int(rec["step"]))

    def _trim_log(self) -> None:
        """Drop the records of steps after the resumed checkpoint (a killed run logged them, the
        resumed one logs them again), so ``metrics.jsonl`` holds each step once."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except json.JSONDecodeError:  # the killed run's torn last line
                    continue
            write_atomic(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in keep)))

    def _init_wandb(self) -> Any:
        mode = self.cfg.logger.wandb_mode
        if rank() != 0 or mode == "disabled":
            return None
        import wandb

        # One wandb run per run_dir: a resume continues the run it resumes (its id kept in the run_dir).
        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4))
        return wandb.init(project=self.cfg.logger.project, name=self.run_dir.name, dir=str(self.run_dir), mode=mode,
                          id=id_file.read_text().strip(), config=OmegaConf.to_container(self.cfg, resolve=True),
                          resume="allow")

    # ----------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "micro": self.micro,
                "micro_batch_size": self.t.micro_batch_size, "best_val_loss": self.best_val,
                "best_val_data": self.val_digest}

    def _resumed_micro(self, state: dict[str, Any], tag: str) -> int:
        """The micro-batch of the saved epoch to go on from, in this run's micro-batch size: a run that
        ran out of memory may resume with a smaller one (and more accumulation)."""
        seen = state["micro"] * state.get("micro_batch_size", self.t.micro_batch_size)  # examples, this rank
        if seen >= self._rank_len():  # saved after the epoch's last (maybe shorter) micro-batch
            return math.ceil(self._rank_len() / self.t.micro_batch_size)
        if seen % self.t.micro_batch_size:
            raise ValueError(f"{tag} stopped after {seen} examples of its epoch on each rank, which micro-batches of "
                             f"train.micro_batch_size={self.t.micro_batch_size} do not divide: resume with a "
                             f"micro-batch size that divides {seen}")
        return seen // self.t.micro_batch_size

    def _rng_path(self, tag: str) -> Path:
        return self.run_dir / "checkpoints" / f"{tag}.rng-rank{rank():05d}.pt"

    def _meta_path(self, tag: str) -> Path:
        return self.run_dir / "checkpoints" / f"{tag}.meta.json"

    def _check_resume(self, tag: str) -> list[str]:
        """Refuse to resume ``tag`` over other data; return ``key: saved -> now`` for each changed setting."""
        if not self._meta_path(tag).exists():
            log.warning("%s was saved by an older version, without %s: its data and settings are not checked",
                        tag, self._meta_path(tag).name)
            return []
        meta = json.loads(self._meta_path(tag).read_text())
        saved, now = meta["data"], self.data_digest
        if saved != now:
            changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise ValueError(f"the training data of source(s) {changed} differ from the data {tag} was trained on "
                             "(a labels file regenerated, a ratio or source changed): the resumed run would draw "
                             "other examples than the run it continues. Restore that data, or train afresh in "
                             "another run_dir")
        saved, now = _flatten(meta["config"]), _flatten(OmegaConf.to_container(self.cfg, resolve=True))
        changed = [k for k in sorted(saved.keys() | now.keys()) if k != "resume" and saved.get(k) != now.get(k)]
        changes = [f"{k}: {saved.get(k, '<unset>')} -> {now.get(k, '<unset>')}" for k in changed]
        if fixed := [c for k, c in zip(changed, changes, strict=True) if _under(k, FIXED_ON_RESUME)]:
            raise ValueError(f"resuming {tag} with {', '.join(fixed)}: its weights would not fit the model these "
                             "settings build, its optimizer state would override the new optimizer's, its place "
                             "in the epoch would point into another order of draws, or its files are laid out for "
                             "another DeepSpeed setting. Resume with the saved values, or train afresh in another "
                             "run_dir")
        if changes and rank() == 0:
            log.warning("resuming %s with settings that differ from those it was saved under:\n  %s", tag,
                        "\n  ".join(changes))
        return changes

    def save_checkpoint(self) -> None:
        """Save to ``run_dir/checkpoints``; a resume never sees a half-written checkpoint."""
        ckpt_dir = self.run_dir / "checkpoints"
        tag = f"step-{self.step:07d}"
        # Every rank's own RNG (its dropout masks differ), written before "latest" can point at the tag.
        rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._rng_path(tag), lambda tmp: torch.save(rng, tmp))
        if rank() == 0:  # what the step was trained on, readable without loading a weight
            meta = {"step": self.step, "config": OmegaConf.to_container(self.cfg, resolve=True),
                    "data": self.data_digest}
            write_atomic(self._meta_path(tag), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        barrier()
        if self.use_ds:
            # DeepSpeed writes every rank's shard, then its "latest" pointer: the pointer moves last.
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=self._state())
        elif rank() == 0:
            model = self.engine.module if hasattr(self.engine, "module") else self.engine
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            state = {"model": trainable, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                     **self._state()}
            write_atomic(ckpt_dir / f"{tag}.pt", lambda tmp: torch.save(state, tmp))
            write_atomic(ckpt_dir / "latest", lambda tmp: tmp.write_text(tag))
        barrier()
        if self.t.keep_checkpoints and rank() == 0:  # only once "latest" points at the new one
            self._prune_checkpoints(ckpt_dir)

    def _prune_checkpoints(self, ckpt_dir: Path) -> None:
        """Delete the checkpoints before the newest ``keep_checkpoints`` up to this step.

        Tags after this step (a run resumed from a rolled-back "latest") are left alone.
        """
        files: dict[int, list[Path]] = {}  # a tag's folder (DeepSpeed) or .pt, its meta and RNG files
        for p in ckpt_dir.iterdir():
            if m := re.fullmatch(r"step-(\d{7})(\..*)?", p.name):
                files.setdefault(int(m.group(1)), []).append(p)
        for step in sorted(s for s in files if s <= self.step)[:-self.t.keep_checkpoints]:
            for p in files[step]:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _resume_point(self) -> tuple[str, list[str]]:
        """The latest checkpoint's tag and the settings changed since it (``_check_resume``), checked
        before the model loads: a resume it would refuse fails in seconds."""
        ckpt_dir = self.run_dir / "checkpoints"
        if not (ckpt_dir / "latest").exists():
            raise FileNotFoundError(f"resume=true but {ckpt_dir}/latest does not exist")
        tag = (ckpt_dir / "latest").read_text().strip()
        if not self._rng_path(tag).exists():
            raise FileNotFoundError(f"{self._rng_path(tag)} is missing: resume {tag} with as many ranks as saved it")
        changes = self._check_resume(tag)
        # DeepSpeed cannot repartition ZeRO's optimizer state over another number of ranks (it says so only
        # once the model has loaded), and each rank's place in the epoch counts its own share of the draws.
        if (saved := len(list(ckpt_dir.glob(f"{tag}.rng-rank*.pt")))) != world():
            raise ValueError(f"{tag} was saved by {saved} ranks and this run has {world()}: resume it with {saved} "
                             "ranks, or train afresh in another run_dir")
        return tag, changes

    def _load_checkpoint(self, tag: str) -> None:
        """Restore checkpoint ``tag`` (from :meth:`_resume_point`) into the built model and optimizer."""
        ckpt_dir = self.run_dir / "checkpoints"
        if self.use_ds:
            with weights_only_loads():
                _, state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        else:
            state = torch.load(ckpt_dir / f"{tag}.pt", map_location="cpu", weights_only=True)
            model = self.engine.module if hasattr(self.engine, "module") else self.engine
            missing = set(state["model"]) - {n for n, _ in model.named_parameters()}
            if missing:
                raise KeyError(f"checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, v in state["model"].items():
                    params[n].copy_(v)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], self._resumed_micro(state, tag)
        self.best_val = state.get("best_val_loss", math.inf)
        if self.best_val < math.inf and state.get("best_val_data") != self.val_digest:
            # A loss on other validation data says nothing about these weights: the next validation sets it.
            if rank() == 0:
                log.warning("data.val differs from the validation data of %s's lowest val_loss (%.4f): the "
                            "next validation replaces %s", tag, self.best_val, self.run_dir / "best")
            self.best_val = math.inf
        rng = torch.load(self._rng_path(tag), map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
        if "cuda_rng" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], self.device)
        log.info("resumed from step %d (epoch %d, micro-batch %d)", self.step, self.epoch, self.micro)

    def _save_weights(self, name: str) -> None:
        """The adapter (``save_pretrained``) and processor as they are now in ``run_dir/<name>``
        (``final``; ``best``: the lowest validation loss so far)."""
        model = self.engine.module if hasattr(self.engine, "module") else self.engine
        with self._gathered(model):
            if rank() == 0:
                save_finetuned(model, self.adapter, self.cfg, self.step, self.run_dir / name)
        barrier()

    def _gathered(self, model: torch.nn.Module) -> Any:
        """Under ZeRO-3 each rank holds a shard of every weight above DeepSpeed's persistence
        threshold and ``save_pretrained`` would write empty tensors: gather, on every rank, the
        weights it writes, the trainable ones (LoRA: the adapter and the modules saved whole; full: all)."""
        if not (self.use_ds and self.engine.zero_optimization_stage() == 3):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])

    def cleanup(self) -> None:
        """Finish logging and leave the process group cleanly."""
        if self._wandb is not None:
            self._wandb.finish()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def save_finetuned(model: torch.nn.Module, adapter: Any, cfg: Any, step: int, out: Path) -> Path:
    """Write trained weights (``save_pretrained``: the LoRA adapter, or the whole tiny model), the
    processor and ``sam4mllm.json`` (what ``load_finetuned`` reads) to ``out``, replacing it whole."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter.processor.save_pretrained(tmp)
    (tmp / "sam4mllm.json").write_text(json.dumps({
        "family": adapter.family, "base": str(adapter.path), "finetune": cfg.train.finetune,
        "variant": cfg.variant, "pqpp_mode": cfg.pqpp_mode, "step": step}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_checkpoint(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None) -> Path:
    """Write checkpoint ``tag`` of a run (default: the latest) as a folder laid out as ``run_dir/final``,
    which ``scripts/eval.py checkpoint=<folder>`` loads; ``out`` defaults to ``run_dir/exported/<tag>``.

    The model is built from the config the checkpoint's meta file holds, on the CPU, and its trainable
    weights are taken from the checkpoint: plain PyTorch's ``<tag>.pt``, or DeepSpeed's fp32 master
    weights, gathered across the ZeRO partitions by DeepSpeed's own reader (its loads made
    ``weights_only``, as a resume's are: :func:`~sam4mllm.training.distributed.weights_only_loads`).
    """
    ckpt = Path(run_dir) / "checkpoints"
    if tag is None:
        if not (ckpt / "latest").exists():
            raise FileNotFoundError(f"{ckpt}/latest does not exist: the run saved no checkpoint (train.save_every)")
        tag = (ckpt / "latest").read_text().strip()
    meta_path = ckpt / f"{tag}.meta.json"
    if not meta_path.exists():
        saved = sorted(p.name.removesuffix(".meta.json") for p in ckpt.glob("step-*.meta.json"))
        raise FileNotFoundError(f"no checkpoint {tag} in {ckpt} (saved: {saved or 'none'})")
    meta = json.loads(meta_path.read_text())
    cfg = OmegaConf.create(meta["config"])
    cfg.model.device = "cpu"
    adapter = build(cfg.model)
    apply_finetuning(adapter, cfg.train)  # the same trainable parameters, under the same names
    if (ckpt / f"{tag}.pt").exists():
        weights = torch.load(ckpt / f"{tag}.pt", map_location="cpu", weights_only=True)["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag, exclude_frozen_parameters=True)
    params = {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}
    # DeepSpeed's reader also lists a tied weight under its alias (lm_head.weight beside embed_tokens');
    # only such aliases are dropped, so any other stray name still fails the check below
    aliases = ({n for n, _ in adapter.model.named_parameters(remove_duplicate=False)}
               - {n for n, _ in adapter.model.named_parameters()})
    weights = {n: w for n, w in weights.items() if n not in aliases}
    if weights.keys() != params.keys():
        odd = sorted(weights.keys() ^ params.keys())
        raise KeyError(f"{tag} holds other trainable parameters than its config builds, e.g. {odd[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return save_finetuned(adapter.model, adapter, cfg, meta["step"], Path(out or Path(run_dir) / "exported" / tag))


def train(cfg: Any) -> list[dict[str, float]]:
    """Set up, train and clean up one run; returns the logged records (rank 0)."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        if hasattr(trainer, "_wandb"):
            trainer.cleanup()
