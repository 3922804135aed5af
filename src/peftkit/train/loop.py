"""The training loop. Nothing here knows which method is being trained: it optimises whatever
parameters have ``requires_grad`` on a model that maps a batch to logits (minGPT's trainer habit).

It also runs data-parallel (see :mod:`peftkit.train.distributed`) and survives faults: SIGINT/SIGTERM
finish the current step and write a checkpoint; a NaN/inf loss or gradient stops the run naming the
step and the last good checkpoint (or skips the batch with ``train.on_nan=skip``); a failed write
(disk full) stops with the reason while earlier checkpoints stay intact.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.config import MethodConfig
from peftkit.core.files import atomic_dir, atomic_write_text
from peftkit.data.collate import Example, batch_order, pack_batch, pad_batch, split_padded
from peftkit.data.tokenize import IGNORE
from peftkit.errors import PeftkitError
from peftkit.train.checkpoint import (
    CheckpointError, TrainState, checkpoint_dir, list_checkpoints, load_checkpoint, remove_stale, save_checkpoint,
    write_error_message,
)
from peftkit.train.compile import compile_blocks
from peftkit.train.config import TrainConfig
from peftkit.train.lm_head import HeadCapture, head_positions, labelled_positions
from peftkit.train.shared_prefix import can_share, checked, shared_prefix_len, shared_prefix_logits
from peftkit.train.distributed import SINGLE, Dist, full_trainable_params, is_sharded, local_value, no_sync, shard, wrap
from peftkit.train.tracking import Tracker, current_memory_mb, peak_memory_mb

MAX_CONSECUTIVE_SKIPS = 10  # train.on_nan=skip gives up after this many bad steps in a row


class TrainingError(PeftkitError):
    """Training cannot go on (e.g. the loss became NaN)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training cleanly after a checkpoint was written.

    A KeyboardInterrupt so that ``except Exception`` does not swallow it; ``exit_code`` is 128 + signal.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    precision = resolve_precision(precision, device)
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
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)
    if device.type == "cpu" and all(callable(f) for f in probe):  # oneDNN's own check (any OS)
        return any(f() for f in probe)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = True,
                share_prefix: bool = True, fused_loss: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Args:
        labelled_only: run the LM head only at each row's labelled positions (see
            :mod:`peftkit.train.lm_head`): the same loss, without the head's work and fp32 logits elsewhere.
        share_prefix: run the leading tokens every row shares once for the batch (see
            :mod:`peftkit.train.shared_prefix`): the same loss, checked once per model.
        fused_loss: with ``labelled_only``, run the head and the cross-entropy together by chunks of positions,
            gradients made in the same pass (:func:`peftkit.train.lm_head.linear_cross_entropy_sum`): the same
            loss without (N, V) logits, where the head is a plain ``nn.Linear`` whose output the model returns
            and the run is not distributed (elsewhere, e.g. an adapted or quantized head, the plain loss;
            ``train.fused_loss=false`` turns it off).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]  # (B, T-1): token t is predicted from position t-1
    n = int((target != IGNORE).sum())
    prefix = shared_prefix_len(batch) if share_prefix and labelled_only else 0
    if prefix and can_share(model):
        # the first-use check runs on the two rows with the most labels: cheap, and still a shared prefix
        rows = (target != IGNORE).sum(dim=1).topk(2).indices.sort().values
        two, two_target = {k: v[rows] for k, v in inputs.items()}, target[rows]
        n_two = int((two_target != IGNORE).sum())
        if checked(model, lambda: (_plain_loss_sum(model, two, two_target, True, fused_loss), n_two),
                   lambda: (_prefix_loss_sum(model, two, two_target, prefix, fused_loss), n_two)):
            return _prefix_loss_sum(model, inputs, target, prefix, fused_loss), n
    return _plain_loss_sum(model, inputs, target, labelled_only, fused_loss), n


def _plain_loss_sum(model: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor,
                    labelled_only: bool, fused_loss: bool = True) -> torch.Tensor:
    """One model call over the whole batch; the head only at labelled positions when it can follow that."""
    seq = target.shape[1] + 1
    if labelled_only:
        index, picked = labelled_positions(target)  # (B, K) each
        capture = HeadCapture.for_model(model) if fused_loss else None
        with head_positions(model, index, seq, capture) as applied:
            logits = model(**inputs, use_cache=False).logits  # (B, K|1|0, V) if captured, (B, K, V) if applied, else (B, T, V)
        if capture is not None and capture.hidden is not None:
            loss = capture.loss_sum(model, logits, picked)  # a failed first-use check reuses these logits
            # None: the logits cannot give the loss (a failed check on a (B, 1) probe, or a model that changed
            # what its head returns after the check): the plain path, once per model
            return loss if loss is not None else _plain_loss_sum(model, inputs, target, labelled_only, False)
        if applied[0] and logits.shape[1] == index.shape[1]:
            return _cross_entropy_sum(logits, picked)
        if logits.shape[1] != seq:  # the model did something the selection cannot follow
            return _plain_loss_sum(model, inputs, target, labelled_only=False)
    else:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    # full logits: shift the labels rather than slicing the (big) logits, which would copy them
    return _cross_entropy_sum(logits, F.pad(target, (0, 1), value=IGNORE))


def _prefix_loss_sum(model: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor, prefix: int,
                     fused_loss: bool = True) -> torch.Tensor:
    index, picked = labelled_positions(target)  # (B, K), labelled positions all >= prefix
    capture = HeadCapture.for_model(model) if fused_loss else None
    logits, selected = shared_prefix_logits(model, inputs, prefix, index.clamp(min=prefix), capture)  # fillers: any position
    if capture is not None and capture.hidden is not None:
        loss = capture.loss_sum(model, logits, picked)  # None: as in _plain_loss_sum
        return loss if loss is not None else _prefix_loss_sum(model, inputs, target, prefix, False)
    if selected:
        return _cross_entropy_sum(logits, picked)  # (B, K, V) vs (B, K)
    return _cross_entropy_sum(logits, F.pad(target, (0, 1), value=IGNORE)[:, prefix:])  # (B, T-P, V)


def _cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_label_count(batch: dict[str, torch.Tensor]) -> int:
    """How many positions :func:`lm_loss_sum` sums over (labels after the shift)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass(frozen=True)
class Objective:
    """What the loop minimises, chosen by the *task* (causal LM, classification, seq2seq), never by the method.

    Attributes:
        loss_sum: ``(model, batch) -> (summed loss, count)``; the loop divides by the count over the whole step.
        count: how many items ``loss_sum`` sums over in a batch (known before the forward: for gradient accumulation).
        collate: ``(examples, pad_id) -> batch`` of tensors.
    """

    loss_sum: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
    count: Callable[[dict[str, torch.Tensor]], int]
    collate: Callable[[Sequence[Example], int], dict[str, torch.Tensor]] = pad_batch


def _next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return lm_loss_sum(model, batch)  # looked up when called, so a patched lm_loss_sum is the one used


def _next_token_loss_unfused(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return lm_loss_sum(model, batch, fused_loss=False)  # also looked up when called


LM_OBJECTIVE = Objective(_next_token_loss, lm_label_count)  # next-token prediction: every causal LM run
LM_OBJECTIVE_UNFUSED = Objective(_next_token_loss_unfused, lm_label_count)  # train.fused_loss=false


def objective_for(objective: Objective, cfg: TrainConfig) -> Objective:
    """The objective a run of ``cfg`` trains with: next-token prediction follows ``train.fused_loss``."""
    return LM_OBJECTIVE_UNFUSED if objective is LM_OBJECTIVE and not cfg.fused_loss else objective


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.lr if cfg.lr is not None else MethodConfig.default_lr  # a RunConfig sets the method's own
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer != "adamw":
        bnb_optimizer = _bnb_optimizer(cfg.optimizer, params[0].device)
        if bnb_optimizer is not None:
            return bnb_optimizer(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw_ok(params))


def fused_adamw_ok(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors) can run: plain CPU/CUDA float tensors.

    Fused does the for-loop update's arithmetic (same results to float rounding), several times faster
    on a full model's parameters; it is also the Trainer's default. Sharded (FSDP) parameters keep the loop.
    """
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return all(p.device.type in ("cpu", "cuda") and p.dtype in floats and not is_sharded(p) for p in params)


def _bnb_optimizer(name: str, device: torch.device) -> Callable[..., torch.optim.Optimizer] | None:
    """bitsandbytes' 8-bit (paged) AdamW class on CUDA; elsewhere None, after a one-line note."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        except ImportError:
            reason = "bitsandbytes is not installed"
    else:
        reason = f"they need CUDA with bitsandbytes (this run is on {device.type})"
    warnings.warn(f"train.optimizer={name}: 8-bit/paged optimizer states skipped, {reason}; using torch AdamW",
                  stacklevel=3)
    return None


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
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, precision: str = "fp32",
                  dist: Dist = SINGLE, objective: Objective = LM_OBJECTIVE) -> float:
    """Mean per-token loss on ``examples`` (per example for classification: see ``objective``), model put in
    eval mode, then restored.

    Distributed: each rank scores its slice of every global batch (``batch_size`` x ranks) and the sums
    are all-reduced, so every rank returns the same value and runs the same number of forwards.
    """
    was_training = model.training
    model.eval()
    device = dist.device if dist.active else model_device(model)
    total, count = 0.0, 0.0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    step = batch_size * dist.world_size
    for s in range(0, len(order), step):
        mine, weight = local_slice(order[s:s + step], dist)
        batch = {k: v.to(device) for k, v in objective.collate([examples[i] for i in mine], pad_id).items()}
        with autocast(device, precision):
            loss, n = objective.loss_sum(model, batch)
        total += float(loss) * weight
        count += n * weight
    total, count = dist.all_reduce_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def local_slice(global_batch: Sequence[int], dist: Dist) -> tuple[list[int], float]:
    """This rank's indices of a global batch and their weight; an empty slice (a short last batch)
    becomes one example with weight 0, so the rank still joins the collectives of the step."""
    mine = shard(global_batch, dist.rank, dist.world_size)
    return (mine, 1.0) if mine else (list(global_batch[:1]), 0.0)


class StopSignal:
    """While active, SIGINT/SIGTERM only set ``signum``: the loop stops after the current step.

    A second signal more than a second after the first stops at once (KeyboardInterrupt); one within
    a second is taken as the same request forwarded by a launcher (torchrun passes signals on).
    Handlers can only be set in the main thread; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
        elif time.monotonic() - self._at > 1.0:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


def warmup_step(max_steps: int, start_step: int = 0) -> int:
    """The step after which memory should stop growing: 20 (issue #16's soak criterion), or half of a shorter
    run; a resumed run counts from where it resumed (its buffers are new)."""
    return start_step + max(1, min(20, (max_steps - start_step) // 2))


@dataclass
class RssMarks:
    """The process's memory after the warm-up step and at the last step: a run whose memory grows with its steps
    (a leak, or an allocator that keeps every batch shape's pages) shows it in the run summary."""

    warmup_step: int
    warmup_mb: float | None = None
    end_mb: float | None = None
    end_step: int | None = None

    def after_step(self, step: int, max_steps: int, device: torch.device) -> float:
        rss = current_memory_mb(device)
        if step == self.warmup_step:
            self.warmup_mb = rss
        self.end_mb, self.end_step = rss, step
        return rss

    def summary(self) -> dict[str, Any]:
        growth = (100 * (self.end_mb - self.warmup_mb) / self.warmup_mb
                  if self.warmup_mb and self.end_mb is not None else None)
        return {"rss_warmup_step": self.warmup_step if self.warmup_mb is not None else None,
                "rss_warmup_mb": None if self.warmup_mb is None else round(self.warmup_mb, 1),
                "rss_end_mb": None if self.end_mb is None else round(self.end_mb, 1),
                "rss_growth_percent": None if growth is None else round(growth, 1)}


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def advance(self, step: int) -> None: ...
    def print(self, message: str) -> None: ...
    def close(self) -> None: ...


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
        output_dir: where metrics and checkpoints go (written by rank 0 only).
        export: writes the model's deliverable (e.g. the adapter) into a folder; used for checkpoints
            and the best-so-far copy.
        packing / group_by_length / max_length: batching options.
        dist: the process group (default: a plain single-process run). ``batch_size`` is per rank.
        objective: the task's loss and batching (default: next-token prediction).
        batch_order: ``epoch -> global batches`` of indices into ``train_data``, deterministic in the epoch
            (resume replays it); default: shuffled, length-grouped epochs. Multi-task runs mix tasks here.
        val_sets: named validation sets (one per task): each is logged as ``eval_loss/<name>`` and
            ``eval_loss`` is their mean; ``val_data`` is then only checked for being non-empty.
        split_padding: run a padded batch as sub-batches of similar-length rows when that computes fewer
            padded tokens (:func:`peftkit.data.collate.split_padded`); the step's loss and gradients are the same.
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
        dist: Dist = SINGLE,
        objective: Objective = LM_OBJECTIVE,
        batch_order: Callable[[int], list[list[int]]] | None = None,
        val_sets: dict[str, Sequence[Example]] | None = None,
        split_padding: bool = True,
    ) -> None:
        if not train_data:
            raise TrainingError("the training set is empty")
        self.model, self.train_data, self.val_data, self.cfg = model, list(train_data), list(val_data), cfg
        self.pad_id, self.output_dir, self.export = pad_id, Path(output_dir), export
        self.packing, self.group_by_length, self.max_length = packing, group_by_length, max_length
        self.show_progress = show_progress
        self.dist = dist
        self.objective = objective_for(objective, cfg)
        self.split_padding = split_padding
        self.batch_order, self.val_sets = batch_order, val_sets
        if cfg.compile:
            compile_blocks(model)
        self.net = wrap(model, dist)  # what forward/backward go through (DDP, FSDP or the model)
        self.device = dist.device if dist.active else model_device(model)
        self.lengths = [len(e["input_ids"]) for e in self.train_data]
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.state = TrainState(world_size=dist.world_size)
        if dist.rank > 0:  # adapter init was seeded alike on every rank; dropout must differ per rank
            torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)

    # -- data --------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global micro-batches (``batch_size`` x ranks) of one epoch: the same order on every rank.

        With ``grad_accum`` k > 1 (padded batches) the epoch is ordered as the batches of one optimizer step
        (``batch_size`` x ranks x k, length-grouped like any batch), each cut into k micro-batches, so a step
        trains on the examples the k-times larger batch would; a short last step is padded with empty
        micro-batches (skipped) so that every step starts at a multiple of k.
        """
        size = self.cfg.batch_size * self.dist.world_size
        budget = size * self.max_length if self.packing else None
        if self.batch_order is not None:
            return self.batch_order(epoch)
        k = self.cfg.grad_accum
        if k == 1 or self.packing:
            return batch_order(self.lengths, size, self.cfg.seed, epoch, self.group_by_length, budget)
        steps = batch_order(self.lengths, size * k, self.cfg.seed, epoch, self.group_by_length)
        micro = [[step[s:s + size] for s in range(0, len(step), size)] for step in steps]
        return [b for m in micro for b in m + [[]] * (k - len(m))]

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], float] | None:
        """This rank's part of the next global batch, and its weight (0 for a stand-in); None for an empty
        micro-batch (the padding of an epoch's short last step)."""
        s = self.state
        if s.batch_in_epoch >= len(self._batches):
            s.epoch += 1
            s.batch_in_epoch = 0
            self._batches = self._epoch_batches(s.epoch)
        if not self._batches[s.batch_in_epoch]:
            s.batch_in_epoch += 1
            return None
        mine, weight = local_slice(self._batches[s.batch_in_epoch], self.dist)
        s.batch_in_epoch += 1
        examples = [self.train_data[i] for i in mine]
        batch = pack_batch(examples, self.pad_id) if self.packing else self.objective.collate(examples, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}, weight

    # -- loop --------------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> TrainState:
        """Train to ``cfg.max_steps``.

        Raises:
            TrainingError: loss or gradient norm not finite (naming the step and last checkpoint).
            CheckpointError: a checkpoint could not be written or read.
            TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the finished step was written.
        """
        cfg = self.cfg
        if resume_from is not None:
            self._resume(resume_from)
        self.tracker = NullTracker()
        self.dist.run_on_main(self._open_output)
        self._batches = self._epoch_batches(self.state.epoch)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self._window = [0.0, 0.0, 0, time.perf_counter()]  # loss sum, tokens, steps, start time
        self._bad_in_row = 0
        self.rss = RssMarks(warmup_step(cfg.max_steps, self.state.step))
        try:
            with StopSignal() as stop:
                while self.state.step < cfg.max_steps:
                    stopping = self._step(stop)
                    if stopping and self.state.step < cfg.max_steps:
                        self._stop(stopping)
        except OSError as e:  # metrics or best-adapter write: disk full, folder removed, ...
            raise CheckpointError(write_error_message(f"to {self.output_dir}", e, self.output_dir)) from None
        finally:
            self.tracker.close()
        return self.state

    def _open_output(self) -> None:
        """Rank 0: the output folder (minus a killed run's temporary leftovers) and the metric sinks."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(self.output_dir)
            self.tracker = Tracker(self.output_dir, self.cfg.max_steps, self.state.step, self.show_progress)
        except OSError as e:
            raise CheckpointError(f"cannot write to output_dir {self.output_dir}: {e.strerror or e}") from None

    def _resume(self, path: Path) -> None:
        saved_world = self.state.world_size
        self.state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.dist)
        if self.state.world_size != saved_world and self.dist.is_main:
            warnings.warn(f"{path} was written by a run on {self.state.world_size} rank(s), resumed on {saved_world}: "
                          "the global batch and so the data order change from here", stacklevel=3)
        self.state.world_size = saved_world
        if self.dist.is_main:
            trim_metrics(self.output_dir / "metrics.jsonl", self.state.step)

    def _step(self, stop: StopSignal) -> int | None:
        """One optimizer step (or a skipped bad batch); returns the signal number if asked to stop."""
        cfg, dist = self.cfg, self.dist
        micro = [m for m in (self._next_batch() for _ in range(cfg.grad_accum)) if m is not None]
        if self.split_padding and not self.packing:  # long rows apart: less padding, the same sums
            micro = [(sub, weight) for batch, weight in micro for sub in split_padded(batch)]
        n_local = sum(self.objective.count(b) * w for b, w in micro)
        n_total = max(dist.all_reduce_sum([n_local])[0] if dist.active else n_local, 1)
        loss_local, tokens, seen = 0.0, 0.0, 0.0
        for i, (batch, weight) in enumerate(micro):
            with no_sync(self.net, last=i == len(micro) - 1):
                with autocast(self.device, cfg.precision):
                    loss_sum, _ = self.objective.loss_sum(self.net, batch)
                # mean over every labelled token of the step on all ranks; x ranks undoes DDP/FSDP's gradient average
                loss = loss_sum * (weight * dist.world_size) / n_total
                loss.backward()
            loss_local += float(loss_sum.detach()) * weight / n_total
            tokens += weight * int(batch["input_ids"].numel())
            seen += weight * int(batch["input_ids"].numel() if self.packing else batch["attention_mask"].sum())
        step_loss, stop_votes, tokens, seen = dist.all_reduce_sum([loss_local, float(stop.signum or 0), tokens, seen])
        bad = None if math.isfinite(step_loss) else f"loss became {step_loss}"
        if bad is None and cfg.max_grad_norm > 0:
            norm = local_value(torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                              cfg.max_grad_norm))
            bad = None if math.isfinite(norm) else f"gradient norm became {norm}"
        if bad is not None:
            self._bad_step(bad)
        else:
            self._bad_in_row = 0
            self.optimizer.step()
            self.scheduler.step()
            self.state.step += 1
            self.state.tokens += int(tokens)
            self._after_step(step_loss, seen)
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank sees the same vote, so all stop after the same step.
        return (stop.signum or signal.SIGTERM) if stop_votes else None

    def _bad_step(self, what: str) -> None:
        where = f"at step {self.state.step + 1}"
        last = list_checkpoints(self.output_dir)
        hint = f"; last good checkpoint: {last[-1]}" if last else "; no checkpoint written yet"
        self._bad_in_row += 1
        if self.cfg.on_nan == "stop":
            raise TrainingError(f"{what} {where}{hint} (train.on_nan=skip skips such batches instead)")
        if self._bad_in_row >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"{what} {where}, {self._bad_in_row} bad batches in a row; giving up{hint}")
        self.state.skipped_batches += 1
        self.tracker.print(f"{what} {where}: batch skipped ({self.state.skipped_batches} so far)")
        self.tracker.log(self.state.step, {"skipped_batch": self.state.skipped_batches})

    def _after_step(self, step_loss: float, seen_tokens: float) -> None:
        cfg, s, w = self.cfg, self.state, self._window
        w[0] += step_loss
        w[1] += seen_tokens
        w[2] += 1
        self.tracker.advance(s.step)
        rss = self.rss.after_step(s.step, cfg.max_steps, self.device)
        if s.step % cfg.log_every == 0 or s.step == cfg.max_steps:
            elapsed = time.perf_counter() - w[3]
            self.tracker.log(s.step, {
                "loss": w[0] / w[2],
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": w[1] / max(elapsed, 1e-9),
                "epoch": s.epoch,
                "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                "rss_mb": round(rss, 1),
            })
            self._window = [0.0, 0.0, 0, time.perf_counter()]
        last_step = s.step == cfg.max_steps
        if self.val_data and ((cfg.eval_every and s.step % cfg.eval_every == 0) or last_step):
            self._evaluate()
        if cfg.save_every and s.step % cfg.save_every == 0 and not last_step:
            self.save()

    def save(self) -> Path:
        """Checkpoint the current state (every rank calls; rank 0 writes)."""
        return save_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler, self.state,
                               self.export, self.cfg.keep_checkpoints, self.dist)

    def _stop(self, signum: int) -> None:
        # Decided from the step alone, so every rank agrees on whether to join a save.
        just_saved = self.cfg.save_every and self.state.step % self.cfg.save_every == 0
        path = checkpoint_dir(self.output_dir) / f"step-{self.state.step:06d}" if just_saved else self.save()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"{name}: stopped after step {self.state.step}/{self.cfg.max_steps}; checkpoint "
                                  f"saved to {path}; continue with --resume", 128 + signum)

    def _evaluate(self) -> None:
        if self.val_sets:  # one loss per task; their mean ranks checkpoints (each task counts the same)
            per_task = {f"eval_loss/{name}": evaluate_loss(self.model, data, self.cfg.batch_size, self.pad_id,
                                                           self.cfg.precision, self.dist, self.objective)
                        for name, data in self.val_sets.items() if data}
            loss = sum(per_task.values()) / len(per_task)
            self.tracker.log(self.state.step, {"eval_loss": loss, **per_task})
        else:
            loss = evaluate_loss(self.model, self.val_data, self.cfg.batch_size, self.pad_id, self.cfg.precision,
                                 self.dist, self.objective)
            self.tracker.log(self.state.step, {"eval_loss": loss})
        s = self.state
        if s.best_eval_loss is None or loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step = loss, s.step
            if self.export is not None:
                with full_trainable_params(self.model):
                    self.dist.run_on_main(self._export_best)

    def _export_best(self) -> None:
        with atomic_dir(self.output_dir / "best") as tmp:
            self.export(tmp)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the well-formed records up to ``step`` (a resumed run logs the later steps again; a kill
    may have cut the last line short)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))
