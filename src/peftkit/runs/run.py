"""A whole training run from a :class:`RunConfig`: what ``peftkit train`` calls."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.allocator import in_use, release_free_memory
from peftkit.core.adapter import ParamCount, count_parameters, get_state
from peftkit.core.files import atomic_write_text
from peftkit.core.inject import inject
from peftkit.core.io import save_adapter
from peftkit.data.load import Splits
from peftkit.data.template import Template
from peftkit.data.tokenize import Encoded
from peftkit.errors import ConfigError, PeftkitError
from peftkit.runs.config import RunConfig, dump_config
from peftkit.runs.export import save_model_folder
from peftkit.runs.final_eval import final_evaluation
from peftkit.runs.memory import BatchShape, measure_shapes, predicted_peak_mb
from peftkit.runs.multitask import MultiTask, build_tasks
from peftkit.runs.task_types import CausalLMTask, get_task
from peftkit.train import distributed
from peftkit.train.checkpoint import CheckpointError, TrainState, list_checkpoints, write_error_message
from peftkit.train.distributed import Dist, full_trainable_params
from peftkit.train.loop import Batching, Trainer, Wiring
from peftkit.train.loss import Objective
from peftkit.train import pair_prompt
from peftkit.train.shared_prefix import was_shared
from peftkit.train.tracking import peak_memory_mb, plot_loss, reset_peak_memory

SUMMARY = "run_summary.json"


@dataclass
class Prepared:
    """A model with its method attached, its tokenizer, template and data: shared by train and eval."""

    model: nn.Module
    tokenizer: Any
    template: Template
    splits: Splits
    task: CausalLMTask | None = None  # the run's task type (runs/task_types.py): data, loss, end-of-run metrics


def prepare(cfg: RunConfig, attach: bool = True) -> Prepared:
    """Load the model and data named by ``cfg`` and (optionally) attach the method, seeded.

    Raises:
        ConfigError / DataError: bad data, or a model folder that cannot be loaded (one line, the reason).
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method_cfg = cfg.method_config()
    task = get_task(cfg.task)
    splits = task.load_splits(cfg) if not cfg.data.tasks else Splits([])  # data.tasks: each task loads its own
    _check_objective(cfg, getattr(splits, "format", None))
    torch.manual_seed(cfg.train.seed)  # a new classification head is initialised while loading
    model, tokenizer = _load_model(cfg, **task.model_kwargs(splits))
    task.after_load(model, splits)
    if attach and cfg.init_adapter:
        _continue_adapter(cfg, model)
    elif attach:
        torch.manual_seed(cfg.train.seed)  # adapter init is part of the run's determinism
        inject(model, task.method_config(model, method_cfg))  # seq_cls: + the head, as modules_to_save
    template = Template.create(tokenizer, cfg.data.template, splits.format)
    return Prepared(model, tokenizer, template, splits, task)


def _check_objective(cfg: RunConfig, data_format: str | None) -> None:
    """The objective fits the data and the run (before the model loads)."""
    from peftkit.runs.preference import objective_name

    name = objective_name(cfg, data_format or "alpaca") if cfg.task == "causal_lm" else cfg.train.objective
    if name not in ("sft", "auto") and (cfg.task != "causal_lm" or cfg.data.packing or cfg.data.tasks):
        raise ConfigError(f"train.objective={name} needs task causal_lm with one preference dataset, unpacked")


def _continue_adapter(cfg: RunConfig, model: nn.Module) -> None:
    """``init_adapter``: attach the saved adapter, trainable; the run's method becomes the adapter's own config."""
    from peftkit.core.io import load_adapter

    load_adapter(model, cfg.init_adapter, trainable=True)
    state = get_state(model)
    loaded = state.configs[state.active[0]]
    if loaded.method_name != cfg.method.method_name:
        raise ConfigError(f"init_adapter {cfg.init_adapter} is a {loaded.method_name} adapter; method.name is "
                          f"{cfg.method.method_name} (leave it out or name the same method)")
    cfg.method = loaded


def _load_model(cfg: RunConfig, **kwargs: Any) -> tuple[nn.Module, Any]:
    """The model, with the many ways a folder can be wrong (missing files, code it wants run with
    trust_remote_code off, damaged weights) turned into one ConfigError line."""
    from peftkit.models import load_model

    try:
        return load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except PeftkitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model {cfg.model}: cannot load ({reason})") from None


def check_output_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a finished run or an unfinished one that could be resumed, and an output_dir
    that cannot be created or written (checked before anything slow happens)."""
    summary = out / SUMMARY
    if summary.is_file() and not overwrite:
        raise ConfigError(f"{out} already holds a finished run; choose another output_dir or set overwrite=true")
    if list_checkpoints(out) and not (resume or overwrite):
        raise ConfigError(f"{out} holds checkpoints of an unfinished run; pass --resume to continue it or set overwrite=true")
    if resume and not list_checkpoints(out):
        raise ConfigError(f"--resume: no checkpoint found in {out / 'checkpoints'}")
    check_writable(out)


def check_resume_config(out: Path, cfg: RunConfig, log: Callable[[str], Any] = print) -> None:
    """Compare the config a run is resumed with against the one it saved (``config.yaml``): refuse changes the
    checkpoint cannot continue under (method and its settings, model, data, optimisation), log those it can
    (``RESUMABLE``: max_steps, log/eval/save frequency, the end-of-run evaluation).

    Raises:
        ConfigError: naming each refused key with its saved and new value.
    """
    from peftkit.runs.config import load_config, resume_changes

    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return  # a run from before config.yaml was written: nothing to compare with
    try:
        saved = load_config(saved_file)
    except ConfigError as e:
        raise ConfigError(f"--resume: the run's saved config cannot be read ({e})") from None
    refused, allowed = resume_changes(saved, cfg)
    if refused:
        diffs = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"--resume: the config differs from the run's {saved_file} in what a checkpoint cannot "
                          f"continue under ({diffs}); resume with the same settings, or start a new output_dir")
    if allowed:
        log("resume: changed " + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in allowed.items()))


def check_writable(out: Path) -> None:
    """``out`` exists as a writable folder, or its nearest existing ancestor is one (so it can be made).

    Raises:
        ConfigError: naming the path in the way (a file, or a folder without write permission).
    """
    probe = Path(os.path.abspath(out))
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output_dir {out} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out} is not writable (no write permission on {probe})")


def train_run(cfg: RunConfig, resume: bool = False, show_progress: bool | None = None, log=print) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` and write the adapter to OUTPUT_DIR/adapter.

    Under torchrun (or with ``train.distributed`` set) every rank calls this; rank 0 alone logs and
    writes files, and every rank returns the same summary.

    Returns:
        The run summary (also written to OUTPUT_DIR/run_summary.json).

    Raises:
        PeftkitError: bad config, data, model or output_dir (before training); NaN loss; a failed write.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written, continue with ``--resume``.
    """
    d = distributed.setup(cfg.train.distributed)
    try:
        return _train(cfg, resume, show_progress, log if d.is_main else (lambda *a, **k: None), d)
    finally:
        distributed.teardown(d)


@dataclass
class _Data:
    """A run's tokenized examples (a multi-task run's: its tasks' mixed, see :mod:`peftkit.runs.multitask`)."""

    train: Encoded
    val: Encoded
    multi: MultiTask | None = None


@dataclass
class _Run:
    """One run's pieces, made by the first steps of :func:`_train` and handed to the later ones."""

    cfg: RunConfig
    out: Path
    d: Dist
    log: Callable[[str], Any]
    start: float  # time.perf_counter() when the run began: the summary's wall time
    prep: Prepared
    data: _Data
    params: ParamCount  # before training

    @property
    def effective_batch(self) -> int:
        t = self.cfg.train
        return t.batch_size * self.d.world_size * t.grad_accum


def _train(cfg: RunConfig, resume: bool, show_progress: bool | None, log: Callable[[str], Any], d: Dist) -> dict[str, Any]:
    """The steps of a run: check the output folder, load, build the data, wire the trainer, fit, score, write the
    result and the summary, log the outcome."""
    out = Path(cfg.output_dir)
    d.run_on_main(lambda: check_output_dir(out, cfg.overwrite, resume))
    if resume:
        d.run_on_main(lambda: check_resume_config(out, cfg, log))
    reset_peak_memory()  # this run's own peak, even when a process trains several (peftkit compare)
    start = time.perf_counter()
    prep = prepare(cfg)
    data = _build_data(cfg, prep, d.world_size)
    run = _Run(cfg, out, d, log, start, prep, data, count_parameters(prep.model))
    _log_setup(run)
    d.run_on_main(lambda: _setup_output_dir(out, cfg, resume))
    final, export = _deliverable(run)
    trainer = _wire_trainer(run, export, show_progress)
    state = _fit(run, trainer, resume)
    shape = _batch_shape(run, trainer)  # before scoring, whose forwards could run the shared-prefix check
    scores = _score(run)
    with full_trainable_params(prep.model):  # FSDP: the whole adapter, not this rank's shard
        summary = d.broadcast(d.run_on_main(lambda: _write_outputs(run, trainer, state, final, export, shape, scores)))
    _log_outcome(run, state, final, summary)
    return summary


def _build_data(cfg: RunConfig, prep: Prepared, world_size: int) -> _Data:
    """The run's training and validation examples, tokenized: at most ``data.max_train_examples`` (drawn by a
    seeded shuffle) and ``data.max_validation_examples`` (the first); a multi-task run's from its tasks.

    Raises:
        ConfigError: no training example is left after tokenization.
    """
    tok, splits, template = prep.tokenizer, prep.splits, prep.template
    multi = build_tasks(cfg, tok, world_size) if cfg.data.tasks else None  # several tasks: runs/multitask.py
    train_rows = splits.train
    if cfg.data.max_train_examples:
        train_rows = list(train_rows)
        random.Random(cfg.train.seed).shuffle(train_rows)
        train_rows = train_rows[: cfg.data.max_train_examples]
    val_rows = splits.validation[: cfg.data.max_validation_examples] if cfg.data.max_validation_examples else splits.validation
    data = _Data(prep.task.encode(template, tok, train_rows, cfg, splits),
                 prep.task.encode(template, tok, val_rows, cfg, splits))
    if multi is not None:
        data = _Data(multi.train, multi.val, multi)
    if not data.train.examples:
        raise ConfigError("no training example is left after tokenization (all responses truncated away?)")
    return data


def _log_setup(run: _Run) -> None:
    """What is about to train: model, method and parameters; the data; the effective batch; the tasks."""
    cfg, d, log, t = run.cfg, run.d, run.log, run.cfg.train
    train, val, splits = run.data.train, run.data.val, run.prep.splits
    effective = run.effective_batch
    log(f"model {cfg.model} | method {cfg.method_config().method_name} | {run.params}")
    log(f"data: {len(train.examples)} train / {len(val.examples)} validation examples, "
        f"template {run.prep.template.kind}; truncated to {cfg.data.max_length} tokens: {train.truncated} train, "
        f"{val.truncated} validation; dropped (nothing left to learn): {train.dropped + val.dropped}")
    if getattr(splits, "test_source", None):  # a held-out test split: which rows eval / compare will score
        log(f"test split: {splits.test_source}")
    if d.active:
        log(f"distributed: {d.mode} on {d.world_size} rank(s), backend {torch.distributed.get_backend()}; "
            f"effective batch {effective} = {t.batch_size} per rank x {d.world_size} ranks x {t.grad_accum} accumulation")
    elif t.grad_accum > 1:
        log(f"effective batch {effective} = {t.batch_size} x {t.grad_accum} accumulation")
    for line in run.data.multi.describe() if run.data.multi is not None else []:
        log(line)


def _setup_output_dir(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Rank 0: the output folder, without a previous run's metrics and summary (unless resuming), and the config."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in ("metrics.jsonl", SUMMARY):
                (out / stale).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    except OSError as e:
        raise ConfigError(f"output_dir {out}: cannot write ({e.strerror or e})") from None


def _deliverable(run: _Run) -> tuple[Path, Callable[[Path], None]]:
    """Where the run's result goes (OUTPUT_DIR/model or OUTPUT_DIR/adapter), and what writes it into a folder
    (that one, a checkpoint's, or ``best/``)."""
    cfg, prep = run.cfg, run.prep
    # full fine-tuning delivers a whole model folder (transformers loads it alone); the rest an adapter
    full_model = cfg.method.writes_full_model
    final = run.out / ("model" if full_model else "adapter")

    def export(path: Path) -> None:
        if full_model:
            save_model_folder(prep.model, prep.tokenizer, path)
        else:
            save_adapter(prep.model, path)
        prep.task.write_extras(path, prep.splits)

    return final, export


def _wire_trainer(run: _Run, export: Callable[[Path], None], show_progress: bool | None) -> Trainer:
    """The loop, with the run's batching, output folder, export, objective and (multi-task) batch order."""
    cfg, prep, data = run.cfg, run.prep, run.data
    tok = prep.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    release_free_memory()  # what loading and quantizing freed goes back to the OS before the steps (jemalloc)
    batching = Batching(pad_id, cfg.data.packing, cfg.data.group_by_length, cfg.data.max_length)
    wiring = Wiring(run.out, export, _objective(run, pad_id), run.d, show_progress=show_progress,
                    **(data.multi.trainer_kwargs() if data.multi is not None else {}))
    return Trainer(prep.model, data.train.examples, data.val.examples, cfg.train, batching, wiring)


def _objective(run: _Run, pad_id: int) -> Objective:
    """The task's objective, or a preference objective on pairs (with the reference computed up front where the
    run needs it: runs/preference.py)."""
    from peftkit.runs import preference

    cfg, prep, data = run.cfg, run.prep, run.data
    name = preference.objective_name(cfg, getattr(prep.splits, "format", None) or "alpaca") \
        if cfg.task == "causal_lm" else "sft"
    if name == "sft":
        return prep.task.objective
    if name not in preference.REFERENCE_FREE and preference.needs_precompute(cfg):
        run.log("reference log-probabilities: computed once, before training")
        for examples in (data.train.examples, data.val.examples):
            preference.precompute_reference(prep.model, examples, pad_id, cfg.train.batch_size)
    return preference.preference_objective(cfg, name)[0]


def _fit(run: _Run, trainer: Trainer, resume: bool) -> TrainState:
    """Train to ``train.max_steps``, from the output folder's last checkpoint when resuming (rank 0 names it)."""
    resume_from = run.d.broadcast(str(list_checkpoints(run.out)[-1]) if resume and run.d.is_main else None)
    if resume_from is not None:
        run.log(f"resuming from {resume_from}")
    return trainer.fit(Path(resume_from) if resume_from else None)


def _batch_shape(run: _Run, trainer: Trainer) -> tuple[BatchShape, ...] | None:
    """The shapes of the run's largest micro-batches, for the memory prediction: its batches replayed on its
    examples (next-token runs, padded batches)."""
    cfg = run.cfg
    if cfg.task != "causal_lm" or cfg.data.packing:
        return None
    t = cfg.train
    shared = was_shared(trainer.net) or pair_prompt.was_shared(trainer.net)  # next-token / preference runs
    return measure_shapes(run.data.train.examples, t.batch_size, shared, seed=t.seed,
                          steps=t.max_steps, grad_accum=t.grad_accum, group_by_length=cfg.data.group_by_length)


def _score(run: _Run) -> dict[str, Any]:
    """End-of-run metrics for the summary: the task type's (seq_cls: test accuracy), a multi-task run's tasks, and
    the config's eval section (per-task test metrics, forgetting: rank 0, on the unsharded model)."""
    cfg, prep, d, log = run.cfg, run.prep, run.d, run.log
    model, tok, splits = prep.model, prep.tokenizer, prep.splits
    task_metrics = prep.task.final_metrics(model, tok, splits, cfg)  # seq_cls: test accuracy
    if task_metrics:
        log(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in task_metrics.items()))
    extra = {"tasks": run.data.multi.summary()} if run.data.multi is not None else {}
    if d.mode != "fsdp":
        load_base = lambda: _load_model(cfg, **prep.task.model_kwargs(splits))[0]  # noqa: E731
        extra.update(d.run_on_main(lambda: final_evaluation(cfg, model, tok, run.out, log, load_base)) or {})
    elif cfg.eval.task_metrics or cfg.eval.forgetting:
        log("eval.task_metrics / eval.forgetting: skipped under FSDP (score the saved adapter with peftkit eval)")
    return {**task_metrics, **extra}


def _write_outputs(run: _Run, trainer: Trainer, state: TrainState, final: Path, export: Callable[[Path], None],
                   shape: tuple[BatchShape, ...] | None, scores: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the result into ``final``, the loss plot, and the run summary (returned).

    Raises:
        CheckpointError: a write failed (disk full, folder removed, ...), naming what and where.
    """
    out = run.out
    try:
        export(final)
    except OSError as e:
        raise CheckpointError(write_error_message(f"the {final.name} to {final}", e, out)) from None
    plot = plot_loss(out / "metrics.jsonl", out / "loss.png")
    summary = _summary(run, trainer, state, final, plot, shape, scores)
    try:
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(write_error_message(str(out / SUMMARY), e, out)) from None
    return summary


def _summary(run: _Run, trainer: Trainer, state: TrainState, final: Path, plot: Path | None,
             shape: tuple[BatchShape, ...] | None, scores: dict[str, Any]) -> dict[str, Any]:
    """The run summary (OUTPUT_DIR/run_summary.json); ``final`` is the folder the result was written to."""
    cfg, params, d, train = run.cfg, run.params, run.d, run.data.train
    return {
        "status": "finished",
        "model": cfg.model,
        "method": cfg.method_config().to_dict(),
        "steps": state.step,
        "tokens": state.tokens,
        "final_eval_loss": _last_eval(run.out),
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": round(params.percent, 4),
        "train_examples": len(train.examples),
        "truncated_train_examples": train.truncated,
        "skipped_batches": state.skipped_batches,
        "world_size": d.world_size,
        "distributed": d.mode,
        "effective_batch_size": run.effective_batch,
        "peak_memory_mb": round(peak_memory_mb(trainer.device), 1),
        "predicted_memory_mb": predicted_peak_mb(cfg, run.prep.model, shape),  # after reading the peak: may allocate a little
        **trainer.rss.summary(),  # memory after warm-up and at the end: growth with the steps shows here
        "wall_time_s": round(time.perf_counter() - run.start, 1),
        "adapter": str(final),
        "output_kind": final.name,
        "loss_plot": str(plot) if plot else None,
        "task": cfg.task,
        **scores,
    }


def _log_outcome(run: _Run, state: TrainState, final: Path, summary: dict[str, Any]) -> None:
    """The end-of-run lines: steps, what was written where (``model`` or ``adapter``), and memory."""
    log = run.log
    log(f"done: {state.step} steps, {final.name} saved to {final}; peak memory {summary['peak_memory_mb']:.0f} MB")
    if summary.get("predicted_memory_mb") is not None:
        log(f"memory: predicted {summary['predicted_memory_mb']:.0f} MB, measured {summary['peak_memory_mb']:.0f} MB "
            f"(allocator: {in_use()})")
    if summary.get("rss_growth_percent") is not None:
        log(f"memory held: {summary['rss_warmup_mb']:,.0f} MB after step {summary['rss_warmup_step']}, "
            f"{summary['rss_end_mb']:,.0f} MB at the end ({summary['rss_growth_percent']:+.1f}%)")


def _last_eval(out: Path) -> float | None:
    from peftkit.train.tracking import read_metrics

    evals = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    return evals[-1] if evals else None


__all__ = ["Prepared", "check_output_dir", "check_writable", "prepare", "train_run"]
