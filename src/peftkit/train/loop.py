"""The training loop. Nothing here knows which method is being trained: it optimises whatever
parameters have ``requires_grad`` on a model that maps a batch to logits (minGPT's trainer habit)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.files import atomic_dir
from peftkit.data.collate import Example, batch_order, pack_batch, pad_batch
from peftkit.data.tokenize import IGNORE
from peftkit.errors import PeftkitError
from peftkit.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from peftkit.train.config import TrainConfig
from peftkit.train.tracking import Tracker, peak_memory_mb


class TrainingError(PeftkitError):
    """Training cannot go on (e.g. the loss became NaN)."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        if not native_bf16(device):
            warnings.warn("precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls are emulated and "
                          "far slower than fp32 here (measured 0.3 vs 120 GFLOP/s); use train.precision=fp32", stacklevel=2)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 matmuls in hardware?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    target = labels[:, 1:]  # (B, T-1): token t is predicted from position t-1
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, n


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, precision: str = "fp32") -> float:
    """Mean per-token loss on ``examples`` (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for s in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in order[s:s + batch_size]], pad_id).items()}
        with autocast(device, precision):
            loss, n = lm_loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing passes gradients through a frozen
    embedding layer (the reentrant kind silently gives adapters below it no gradient)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing")


class Trainer:
    """Runs optimisation steps with checkpoints, evaluation and logging.

    Args:
        model: a model with its trainable parameters already chosen (by a method or not).
        train_data / val_data: tokenized examples (``input_ids``, ``labels``).
        cfg: optimisation settings.
        pad_id: padding token id.
        output_dir: where metrics and checkpoints go.
        export: writes the model's deliverable (e.g. the adapter) into a folder; used for checkpoints
            and the best-so-far copy.
        packing / group_by_length / max_length: batching options.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Sequence[Example],
        val_data: Sequence[Example],
        cfg: TrainConfig,
        pad_id: int,
        output_dir: Path,
        export: Callable[[Path], None] | None = None,
        packing: bool = False,
        group_by_length: bool = True,
        max_length: int = 256,
        show_progress: bool | None = None,
    ) -> None:
        if not train_data:
            raise TrainingError("the training set is empty")
        self.model, self.train_data, self.val_data, self.cfg = model, list(train_data), list(val_data), cfg
        self.pad_id, self.output_dir, self.export = pad_id, Path(output_dir), export
        self.packing, self.group_by_length, self.max_length = packing, group_by_length, max_length
        self.show_progress = show_progress
        self.device = model_device(model)
        self.lengths = [len(e["input_ids"]) for e in self.train_data]
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.state = TrainState()

    # -- data --------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        budget = self.cfg.batch_size * self.max_length if self.packing else None
        return batch_order(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch, self.group_by_length, budget)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        s = self.state
        if s.batch_in_epoch >= len(self._batches):
            s.epoch += 1
            s.batch_in_epoch = 0
            self._batches = self._epoch_batches(s.epoch)
        examples = [self.train_data[i] for i in self._batches[s.batch_in_epoch]]
        s.batch_in_epoch += 1
        batch = pack_batch(examples, self.pad_id) if self.packing else pad_batch(examples, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- loop --------------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> TrainState:
        cfg = self.cfg
        if resume_from is not None:
            self.state = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
        self._batches = self._epoch_batches(self.state.epoch)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        tracker = Tracker(self.output_dir, cfg.max_steps, self.state.step, self.show_progress)
        params = [p for p in self.model.parameters() if p.requires_grad]
        window_tokens, window_start, window_loss, window_steps = 0, time.perf_counter(), 0.0, 0
        try:
            while self.state.step < cfg.max_steps:
                micro = [self._next_batch() for _ in range(cfg.grad_accum)]
                n_total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
                step_loss = 0.0
                for batch in micro:
                    with autocast(self.device, cfg.precision):
                        loss_sum, _ = lm_loss_sum(self.model, batch)
                    loss = loss_sum / max(n_total, 1)  # mean over every labelled token of the step
                    loss.backward()
                    step_loss += float(loss.detach())
                    window_tokens += int(batch["input_ids"].numel() if self.packing else batch["attention_mask"].sum())
                if not math.isfinite(step_loss):
                    last = list_checkpoints(self.output_dir)
                    where = f"; last good checkpoint: {last[-1]}" if last else ""
                    raise TrainingError(f"loss became {step_loss} at step {self.state.step + 1}{where}")
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                self.state.tokens += sum(int(b["input_ids"].numel()) for b in micro)
                window_loss += step_loss
                window_steps += 1
                tracker.advance(self.state.step)
                if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tracker.log(self.state.step, {
                        "loss": window_loss / window_steps,
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "epoch": self.state.epoch,
                        "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                    })
                    window_tokens, window_start, window_loss, window_steps = 0, time.perf_counter(), 0.0, 0
                last_step = self.state.step == cfg.max_steps
                if self.val_data and ((cfg.eval_every and self.state.step % cfg.eval_every == 0) or last_step):
                    self._evaluate(tracker)
                if cfg.save_every and self.state.step % cfg.save_every == 0 and not last_step:
                    save_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler, self.state,
                                    self.export, cfg.keep_checkpoints)
        finally:
            tracker.close()
        return self.state

    def _evaluate(self, tracker: Tracker) -> None:
        loss = evaluate_loss(self.model, self.val_data, self.cfg.batch_size, self.pad_id, self.cfg.precision)
        tracker.log(self.state.step, {"eval_loss": loss})
        s = self.state
        if s.best_eval_loss is None or loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step = loss, s.step
            if self.export is not None:
                with atomic_dir(self.output_dir / "best") as tmp:
                    self.export(tmp)
