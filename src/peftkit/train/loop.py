"""The training loop. Nothing here knows which method is being trained: it optimises whatever
parameters have ``requires_grad`` on a model that maps a batch to logits (minGPT's trainer habit).

It also runs data-parallel (see :mod:`peftkit.train.distributed`) and survives faults: SIGINT/SIGTERM
finish the current step and write a checkpoint; a NaN/inf loss or gradient stops the run naming the
step and the last good checkpoint (or skips the batch with ``train.on_nan=skip``); a failed write
(disk full) stops with the reason while earlier checkpoints stay intact.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.files import atomic_dir, atomic_write_text
from peftkit.data.collate import Example, accumulated_batches, batch_order, pack_batch, split_padded
from peftkit.errors import TrainingError
from peftkit.train.checkpoint import (
    CheckpointError,
    TrainState,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    remove_stale,
    save_checkpoint,
    write_error_message,
)
from peftkit.train.compile import compile_blocks
from peftkit.train.config import TrainConfig
from peftkit.train.distributed import SINGLE, Dist, full_trainable_params, local_slice, local_value, no_sync, wrap
from peftkit.train.loss import LM_OBJECTIVE, Objective, evaluate_loss, objective_for
from peftkit.train.optim import make_optimizer, make_scheduler
from peftkit.train.precision import autocast, model_device
from peftkit.train.tracking import NullTracker, Tracker, current_memory_mb, peak_memory_mb

MAX_CONSECUTIVE_SKIPS = 10  # train.on_nan=skip gives up after this many bad steps in a row


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training cleanly after a checkpoint was written.

    A KeyboardInterrupt so that ``except Exception`` does not swallow it; ``exit_code`` is 128 + signal.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


@dataclass
class LogWindow:
    """The steps since the last logged one: their mean loss and tokens per second are what gets logged."""

    loss_sum: float = 0.0  # sum of the steps' mean losses
    tokens: float = 0.0  # tokens the steps saw (padding excluded)
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Batching:
    """How training examples become batches: the run's ``data:`` settings and the tokenizer's pad id.

    Attributes:
        pad_id: padding token id.
        packing: concatenate examples into rows of ``max_length`` tokens (``batch_size`` rows a batch).
        group_by_length: batches of examples of similar length (less padding).
        max_length: the length of a packed row.
        split_padding: run a padded batch as sub-batches of similar-length rows when that computes fewer
            padded tokens (:func:`peftkit.data.collate.split_padded`); the step's loss and gradients are the same.
    """

    pad_id: int
    packing: bool = False
    group_by_length: bool = True
    max_length: int = 256
    split_padding: bool = True


@dataclass
class Wiring:
    """What the run around the loop plugs into it.

    Attributes:
        output_dir: where metrics and checkpoints go (written by rank 0 only).
        export: writes the model's deliverable (e.g. the adapter) into a folder; used for checkpoints
            and the best-so-far copy.
        objective: the task's loss and batching (default: next-token prediction).
        dist: the process group (default: a plain single-process run). ``batch_size`` is per rank.
        batch_order: ``epoch -> global batches`` of indices into the training data, deterministic in the epoch
            (resume replays it); default: shuffled, length-grouped epochs. Multi-task runs mix tasks here.
        val_sets: named validation sets (one per task): each is logged as ``eval_loss/<name>`` and
            ``eval_loss`` is their mean; the trainer's ``val_data`` is then only checked for being non-empty.
        show_progress: a progress bar (default: when stderr is a terminal; else plain lines).
    """

    output_dir: Path
    export: Callable[[Path], None] | None = None
    objective: Objective = LM_OBJECTIVE
    dist: Dist = field(default_factory=lambda: SINGLE)
    batch_order: Callable[[int], list[list[int]]] | None = None
    val_sets: dict[str, Sequence[Example]] | None = None
    show_progress: bool | None = None


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
        batching: how examples become batches (pad id, packing, length grouping).
        wiring: what the run plugs in: output folder, export, objective, process group, multi-task order.
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Example], val_data: Sequence[Example],
                 cfg: TrainConfig, batching: Batching, wiring: Wiring) -> None:
        if not train_data:
            raise TrainingError("the training set is empty")
        self.model, self.train_data, self.val_data, self.cfg = model, list(train_data), list(val_data), cfg
        self.batching, self.wiring, dist = batching, wiring, wiring.dist
        self.output_dir, self.export, self.dist = Path(wiring.output_dir), wiring.export, dist
        self.objective = objective_for(wiring.objective, cfg)
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

        With ``grad_accum`` k > 1 (padded batches) a step's k micro-batches hold the examples of one k-times
        larger batch (:func:`peftkit.data.collate.accumulated_batches`).
        """
        size, b = self.cfg.batch_size * self.dist.world_size, self.batching
        budget = size * b.max_length if b.packing else None
        if self.wiring.batch_order is not None:
            return self.wiring.batch_order(epoch)
        if b.packing:
            return batch_order(self.lengths, size, self.cfg.seed, epoch, b.group_by_length, budget)
        return accumulated_batches(self.lengths, size, self.cfg.grad_accum, self.cfg.seed, epoch, b.group_by_length)

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
        pad_id = self.batching.pad_id
        batch = pack_batch(examples, pad_id) if self.batching.packing else self.objective.collate(examples, pad_id)
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
        self.tracker: Tracker | NullTracker = NullTracker()
        self.dist.run_on_main(self._open_output)
        self._batches = self._epoch_batches(self.state.epoch)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self._window = LogWindow()
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
            self.tracker = Tracker(self.output_dir, self.cfg.max_steps, self.state.step, self.wiring.show_progress)
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
        packing = self.batching.packing
        if self.batching.split_padding and not packing:  # long rows apart: less padding, the same sums
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
            seen += weight * int(batch["input_ids"].numel() if packing else batch["attention_mask"].sum())
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
        w.loss_sum += step_loss
        w.tokens += seen_tokens
        w.steps += 1
        self.tracker.advance(s.step)
        rss = self.rss.after_step(s.step, cfg.max_steps, self.device)
        if s.step % cfg.log_every == 0 or s.step == cfg.max_steps:
            elapsed = time.perf_counter() - w.start
            self.tracker.log(s.step, {
                "loss": w.loss_sum / w.steps,
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": w.tokens / max(elapsed, 1e-9),
                "epoch": s.epoch,
                "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                "rss_mb": round(rss, 1),
                **(self.objective.metrics() if self.objective.metrics is not None else {}),
            })
            self._window = LogWindow()
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
        pad_id = self.batching.pad_id
        if self.wiring.val_sets:  # one loss per task; their mean ranks checkpoints (each task counts the same)
            per_task = {f"eval_loss/{name}": evaluate_loss(self.model, data, self.cfg.batch_size, pad_id,
                                                           self.cfg.precision, self.dist, self.objective)
                        for name, data in self.wiring.val_sets.items() if data}
            loss = sum(per_task.values()) / len(per_task)
            self.tracker.log(self.state.step, {"eval_loss": loss, **per_task})
        else:
            loss = evaluate_loss(self.model, self.val_data, self.cfg.batch_size, pad_id, self.cfg.precision,
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
