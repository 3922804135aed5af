"""Scoring after training, as the run config's ``eval`` section asks: each task's test metric and the
forgetting report (both off by default). Results go to OUTPUT_DIR/task_metrics.json and
OUTPUT_DIR/forgetting.json, and a short form into the run summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftkit.core.files import atomic_write_text
from peftkit.errors import PeftkitError
from peftkit.runs.config import RunConfig
from peftkit.train.checkpoint import CheckpointError, write_error_message

TASK_METRICS = "task_metrics.json"
FORGETTING = "forgetting.json"


def final_evaluation(cfg: RunConfig, model: nn.Module, tokenizer: Any, out: Path, log: Callable[[str], Any],
                     load_base: Callable[[], nn.Module]) -> dict[str, Any]:
    """Run what ``cfg.eval`` asks for on the trained ``model``; returns the run-summary entries.

    Args:
        load_base: loads the untouched base model; called only for the forgetting report of methods
            that train base weights in place (their adapters cannot be switched off).
    """
    result: dict[str, Any] = {}
    if cfg.eval.task_metrics:
        result["task_metrics"] = _guard("eval.task_metrics", log,
                                        lambda: _task_metrics(cfg, model, tokenizer, out, log))
    if cfg.eval.forgetting:
        result["forgetting"] = _guard("eval.forgetting", log,
                                      lambda: _forgetting(cfg, model, tokenizer, out, log, load_base))
    return result


def _guard(what: str, log: Callable[[str], Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``; a user error (bad task name, unreadable file) is logged and recorded, not raised: the
    trained adapter is still saved."""
    try:
        return fn()
    except PeftkitError as e:
        log(f"{what} failed: {e} (the trained model is saved; score it with peftkit eval)")
        return {"error": str(e)}


def _task_metrics(cfg: RunConfig, model: nn.Module, tokenizer: Any, out: Path,
                  log: Callable[[str], Any]) -> dict[str, Any]:
    from peftkit.runs.multitask import task_test_metrics

    metrics = task_test_metrics(model, tokenizer, cfg, log)
    _write(out / TASK_METRICS, metrics, out)
    return {name: {k: m[k] for k in ("metric", "value", "n")} for name, m in metrics.items()}


def _forgetting(cfg: RunConfig, model: nn.Module, tokenizer: Any, out: Path, log: Callable[[str], Any],
                load_base: Callable[[], nn.Module]) -> dict[str, Any]:
    from peftkit.eval.forgetting import default_tasks, forgetting_report, format_report

    e = cfg.eval
    trained = [t.train for t in cfg.data.tasks] or [cfg.data.train]
    tasks = e.forgetting_tasks if e.forgetting_tasks is not None else default_tasks(trained)
    report = forgetting_report(model, tokenizer, tasks, e.forgetting_tokens, e.forgetting_examples,
                               e.forgetting_text, cfg.data.template, base=load_base, seed=cfg.train.seed)
    _write(out / FORGETTING, report, out)
    log(format_report(report))
    return {k: {f: s[f] for f in ("before", "after", "forgetting")} for k, s in report["scores"].items()}


def _write(path: Path, data: Any, out: Path) -> None:
    try:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(write_error_message(str(path), e, out)) from None


__all__ = ["final_evaluation"]
