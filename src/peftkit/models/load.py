"""A trained model back from disk: the task it was made for, its class names (label files), the right head
and its adapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.errors import AdapterFileError, ConfigError

LABELS_FILE = "peftkit_labels.json"  # class names of a seq_cls adapter, in head order (PEFT ignores the file)


PEFT_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq"}


def set_label_names(model: nn.Module, labels: Sequence[str]) -> None:
    """Record the class names on the model's config (a full fine-tune's ``config.json`` then carries them)."""
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def write_labels(path: str | Path, labels: Sequence[str]) -> None:
    """Store the class names beside a seq_cls adapter (PEFT files have no place for them)."""
    (Path(path) / LABELS_FILE).write_text(json.dumps({"labels": list(labels)}, indent=2) + "\n", encoding="utf-8")


def read_labels(path: str | Path) -> list[str] | None:
    """The class names stored beside an adapter, or None (e.g. an adapter made by PEFT)."""
    file = Path(path) / LABELS_FILE
    if not file.is_file():
        return None
    try:
        labels = json.loads(file.read_text(encoding="utf-8"))["labels"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file}: unreadable label list ({type(e).__name__})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise AdapterFileError(f"{file}: 'labels' must be a list of strings")
    return labels


def head_size_in_file(adapter: str | Path) -> int | None:
    """Number of classes of a seq_cls adapter, read from its head tensor (None when the file has none)."""
    from safetensors import safe_open

    from peftkit.core.io import WEIGHTS_NAME

    file = Path(adapter) / WEIGHTS_NAME
    if not file.is_file():
        return None
    sizes = []
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.endswith(".weight") and any(p in ("classifier", "score") for p in parts):
                sizes.append(f.get_slice(key).get_shape()[0])
    return min(sizes) if sizes else None  # a RoBERTa-style head: dense (H x H), then out_proj (C x H)


def detect_task(model_name: str, adapter: str | None = None) -> str:
    """The task a model folder (or an adapter over it) was made for: from the adapter's ``task_type``, else
    from the folder's ``config.json`` (a ``...ForSequenceClassification`` architecture, an encoder-decoder)."""
    if adapter:
        from peftkit.core.io import read_adapter_config

        task = PEFT_TASK_TYPES.get(read_adapter_config(adapter).get("task_type") or "")
        if task:
            return task
    from peftkit.models import resolve_model

    try:
        config = json.loads((resolve_model(model_name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, ModuleNotFoundError):
        return "causal_lm"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "seq_cls"
    return "seq2seq" if config.get("is_encoder_decoder") else "causal_lm"


def load_for_eval(model_name: str, adapter: str | None = None, strict_base: bool = False) -> tuple[nn.Module, Any]:
    """Model (+ adapter) loaded with the right head for its task; a seq_cls model's config carries its class
    names (from the adapter's label file, when there is one). ``strict_base``: refuse an adapter trained on
    another base (core/identity.py) instead of warning."""
    from peftkit.core.io import load_adapter
    from peftkit.models import load_model

    task = detect_task(model_name, adapter)
    kwargs: dict[str, Any] = {}
    labels = None
    if task == "seq_cls" and adapter:
        labels = read_labels(adapter)
        size = len(labels) if labels else head_size_in_file(adapter)
        if size:
            kwargs["num_labels"] = size
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if task == "seq_cls" and adapter:  # transformers reports the new head as missing; the adapter brings it
        hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # a new head is the same on every load; the caller's RNG is untouched
            torch.manual_seed(0)
            model, tok = load_model(model_name, task=task, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if labels:
        set_label_names(model, labels)
    if adapter:
        load_adapter(model, adapter, strict_base=strict_base)
    return model, tok


def is_seq_cls(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def model_labels(model: nn.Module, data_labels: Sequence[str]) -> list[str]:
    """Class names in head order: the model's own (when they name the data's labels), else the data's sorted set.

    Raises:
        ConfigError: the head has a different number of classes than the data.
    """
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    if names and set(data_labels) <= set(names):
        return names
    n = int(getattr(model.config, "num_labels", len(data_labels)))
    if n != len(data_labels):
        raise ConfigError(f"the model's head has {n} classes but the data has {len(data_labels)} labels "
                          f"({', '.join(data_labels)})")
    return list(data_labels)
