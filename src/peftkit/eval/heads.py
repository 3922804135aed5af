"""Accuracy of a classification head (``seq_cls`` models): predicted classes and accuracy on a split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from peftkit.data.classification import load_classification
from peftkit.data.collate import pad_batch
from peftkit.models.load import model_labels
from peftkit.train.precision import autocast, model_device


@torch.no_grad()
def predict_classes(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256,
                    batch_size: int = 32, precision: str = "fp32") -> list[int]:
    """The head's arg-max class for each text (batched, right-padded; model put in eval mode, then restored)."""
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    encoded = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    preds = [0] * len(texts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = pad_batch([{"input_ids": encoded[i]} for i in idx], pad_id)
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # (B, C)
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    return preds


def classification_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], labels: Sequence[str],
                            max_length: int = 256, batch_size: int = 32, precision: str = "fp32") -> dict[str, Any]:
    """Accuracy of the head on ``{"text", "label"}`` rows; ``labels`` are the class names in head order.

    Returns:
        ``{"accuracy", "n", "predictions"}`` (predicted class names).
    """
    preds = predict_classes(model, tokenizer, [r["text"] for r in rows], max_length, batch_size, precision)
    names = [labels[p] if p < len(labels) else str(p) for p in preds]
    correct = sum(n == r["label"] for n, r in zip(names, rows))
    return {"accuracy": correct / max(len(rows), 1), "n": len(rows), "predictions": names}


def evaluate_seq_cls(model: nn.Module, tokenizer: Any, data: str, split: str = "test", limit: int | None = None,
                     seed: int = 0, max_length: int = 256, batch_size: int = 32,
                     test: str | None = None) -> dict[str, Any]:
    """Accuracy of a classification head on ``split`` of ``data`` (the first ``limit`` of a seeded shuffle);
    ``test``: a file scored whole as the test split."""
    import random

    from peftkit.errors import DataError

    splits = load_classification(data, test=test, validation_fraction=0.0, seed=seed)
    rows = list(getattr(splits, split))
    if not rows and data not in _builtin_names():
        rows = list(splits.train)  # a user file is the thing to evaluate
    if not rows:
        raise DataError(f"{data!r} has no {split} split")
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    labels = model_labels(model, splits.labels)
    res = classification_accuracy(model, tokenizer, rows, labels, max_length, batch_size)
    return {"task": "classification", "data": data, "split": split, "n": res["n"], "shots": 0, "accuracy": res["accuracy"],
            "predictions": res["predictions"], "rows": rows}


def _builtin_names() -> set[str]:
    from peftkit.data.builtin import BUILTIN_DATASETS

    return set(BUILTIN_DATASETS)
