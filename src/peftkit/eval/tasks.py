"""Evaluating a model (with or without an adapter) on a task's split: what ``peftkit eval`` calls."""

from __future__ import annotations

import random
from typing import Any

import torch.nn as nn

from peftkit.data.load import load_splits
from peftkit.data.template import Template
from peftkit.errors import ConfigError
from peftkit.eval.classify import classify


def load_model_with_adapter(model_name: str, adapter: str | None = None) -> tuple[nn.Module, Any]:
    from peftkit.core.io import load_adapter
    from peftkit.models import load_model

    model, tok = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
    return model, tok


def evaluate_classification(
    model: nn.Module,
    tokenizer: Any,
    data: str = "rotten-tomatoes",
    split: str = "test",
    limit: int | None = None,
    template: str = "auto",
    options: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Accuracy by label likelihood on ``split`` of ``data`` (first ``limit`` examples of a seeded shuffle)."""
    splits = load_splits(data, fmt="auto", seed=seed)
    rows = getattr(splits, split, None)
    if rows is None or split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {split!r}")
    if not rows:
        raise ConfigError(f"dataset {data!r} has no {split} split")
    options = options or splits.label_options or sorted({r.get("output") for r in rows})
    if len(options) > 50:
        raise ConfigError(f"{data!r} does not look like a classification task ({len(options)} distinct outputs)")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    tmpl = Template.create(tokenizer, template, splits.format)
    result = classify(model, tmpl, rows, options, "output", batch_size, precision)
    return {"data": data, "split": split, "accuracy": result.accuracy, "n": result.n, "options": options,
            "predictions": result.predictions}
