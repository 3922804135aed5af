"""Task types: what a run trains the model *to do*, independent of the method that chooses what trains.

* ``causal_lm`` — next-token prediction on prompt + response (the default; ``AutoModelForCausalLM``).
* ``seq_cls`` — sequence classification: ``AutoModelForSequenceClassification`` with one output per label
  of the data, cross-entropy on the head's logits. The head (``classifier`` on BERT, ``score`` on Llama:
  PEFT's names) trains besides the method's own parameters and is saved with the adapter exactly as PEFT's
  ``modules_to_save`` does: file keys ``base_model.model.classifier.weight``, config field
  ``modules_to_save``, ``task_type`` ``SEQ_CLS``. Accuracy on the test split is scored at the end of a run.
* ``seq2seq`` — encoder-decoder LM (T5): the prompt is the encoder's input, the response the decoder's
  labels (the model shifts them right itself), cross-entropy over the response tokens.

Each task gives the training loop an :class:`~peftkit.train.loop.Objective` (loss and batching); the loop
itself never looks at the task or the method.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.config import MethodConfig
from peftkit.core.targeting import classification_head_names
from peftkit.data.classification import ClassificationSplits, encode_classification, load_classification
from peftkit.data.collate import Example, pad_batch
from peftkit.data.load import Splits, load_splits
from peftkit.data.template import Template
from peftkit.data.tokenize import IGNORE, Encoded, encode_all
from peftkit.errors import AdapterFileError, ConfigError
from peftkit.train.loop import LM_OBJECTIVE, Objective, autocast, model_device

TASKS = ("causal_lm", "seq_cls", "seq2seq")
LABELS_FILE = "peftkit_labels.json"  # class names of a seq_cls adapter, in head order (PEFT ignores the file)
PEFT_TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq"}


# -- sequence classification ---------------------------------------------------------------------------------


def cls_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and one class index per row: ``labels`` (B,)."""
    batch = pad_batch([{"input_ids": e["input_ids"]} for e in examples], pad_id)
    batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (B,)
    return batch


def cls_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the head's logits against the class indices, and the number of examples."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss, int(batch["labels"].numel())


CLS_OBJECTIVE = Objective(loss_sum=cls_loss_sum, count=lambda b: int(b["labels"].numel()), collate=cls_collate)


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


def with_head(model: nn.Module, method_cfg: MethodConfig) -> MethodConfig:
    """The method config with the model's classification head added to ``modules_to_save`` (as PEFT does for
    ``SEQ_CLS``), so the head trains and is saved with the adapter.

    Raises:
        ConfigError: the model has no ``classifier``/``score`` head, or the method cannot carry extra modules.
    """
    heads = classification_head_names(model)
    if not heads:
        raise ConfigError(f"task seq_cls: {type(model).__name__} has no classification head named classifier or score")
    fields = {f.name for f in dataclasses.fields(method_cfg)}
    if "modules_to_save" not in fields:
        raise ConfigError(f"task seq_cls: method {method_cfg.method_name} cannot train the classification head "
                          f"beside its own parameters (it has no modules_to_save); use e.g. lora, ia3, dora, "
                          f"bottleneck_adapter, linear_probe, bitfit, selective or full")
    current = list(getattr(method_cfg, "modules_to_save", None) or [])
    return dataclasses.replace(method_cfg, modules_to_save=current + [h for h in heads if h not in current])


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


# -- seq2seq ------------------------------------------------------------------------------------------------


def seq2seq_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder ``input_ids`` / ``attention_mask`` padded with ``pad_id``; decoder ``labels`` padded with IGNORE."""
    batch = pad_batch([{"input_ids": e["input_ids"]} for e in examples], pad_id)
    del batch["labels"]
    width = max(len(e["labels"]) for e in examples)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, L)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    return batch


def seq2seq_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens. The model builds its decoder input from ``labels``
    (shifted right, starting with its decoder start token), so logits position t predicts ``labels[:, t]``."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   use_cache=False).logits  # (B, L, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


SEQ2SEQ_OBJECTIVE = Objective(loss_sum=seq2seq_loss_sum, count=lambda b: int((b["labels"] != IGNORE).sum()),
                              collate=seq2seq_collate)


def encode_seq2seq(template: Template, rows: Sequence[dict[str, Any]], max_length: int) -> Encoded:
    """``{"input_ids": prompt tokens, "labels": response tokens + eos}``, each cut to ``max_length``."""
    out = Encoded()
    for row in rows:
        prompt = template.prompt_ids(row)
        response = template.response_ids(template.response_text(row))
        out.truncated += len(prompt) > max_length or len(response) > max_length
        if not response:
            out.dropped += 1
            continue
        out.examples.append({"input_ids": prompt[:max_length], "labels": response[:max_length]})
    return out


# -- the task objects run.py uses ---------------------------------------------------------------------------


class CausalLMTask:
    """Next-token prediction (what peftkit did before task types existed)."""

    name = "causal_lm"
    objective: Objective = LM_OBJECTIVE

    def load_splits(self, cfg: Any) -> Splits | ClassificationSplits:
        d = cfg.data
        return load_splits(d.train, d.validation, d.test, d.format, d.validation_fraction, cfg.train.seed)

    def model_kwargs(self, splits: Any) -> dict[str, Any]:
        return {"task": self.name}

    def after_load(self, model: nn.Module, splits: Any) -> None:
        """Fix up the freshly loaded model (e.g. record label names)."""

    def method_config(self, model: nn.Module, method_cfg: MethodConfig) -> MethodConfig:
        return method_cfg

    def encode(self, template: Template, tokenizer: Any, rows: list[dict[str, Any]], cfg: Any, splits: Any) -> Encoded:
        return encode_all(template, rows, cfg.data.max_length, cfg.data.train_on_prompt, cfg.data.chat_loss)

    def write_extras(self, path: Path, splits: Any) -> None:
        """Files written next to the exported adapter/model."""

    def final_metrics(self, model: nn.Module, tokenizer: Any, splits: Any, cfg: Any) -> dict[str, Any]:
        return {}


class SeqClsTask(CausalLMTask):
    name = "seq_cls"
    objective = CLS_OBJECTIVE

    def load_splits(self, cfg: Any) -> ClassificationSplits:
        d = cfg.data
        return load_classification(d.train, d.validation, d.test, d.validation_fraction, cfg.train.seed)

    def model_kwargs(self, splits: ClassificationSplits) -> dict[str, Any]:
        return {"task": self.name, "num_labels": len(splits.labels)}

    def after_load(self, model: nn.Module, splits: ClassificationSplits) -> None:
        set_label_names(model, splits.labels)

    def method_config(self, model: nn.Module, method_cfg: MethodConfig) -> MethodConfig:
        return with_head(model, method_cfg)

    def encode(self, template: Template, tokenizer: Any, rows: list[dict[str, Any]], cfg: Any,
               splits: ClassificationSplits) -> Encoded:
        examples, truncated = encode_classification(tokenizer, rows, splits.labels, cfg.data.max_length)
        return Encoded(examples, truncated, 0)

    def write_extras(self, path: Path, splits: ClassificationSplits) -> None:
        write_labels(path, splits.labels)

    def final_metrics(self, model: nn.Module, tokenizer: Any, splits: ClassificationSplits, cfg: Any) -> dict[str, Any]:
        rows = splits.test[: cfg.data.max_test_examples] if cfg.data.max_test_examples else splits.test
        if not rows:
            return {}
        res = classification_accuracy(model, tokenizer, rows, splits.labels, cfg.data.max_length,
                                      cfg.train.batch_size * 2, cfg.train.precision)
        return {"test_accuracy": res["accuracy"], "test_examples": res["n"]}


class Seq2SeqTask(CausalLMTask):
    name = "seq2seq"
    objective = SEQ2SEQ_OBJECTIVE

    def load_splits(self, cfg: Any) -> Splits:
        splits = super().load_splits(cfg)
        if splits.format == "text":
            raise ConfigError("task seq2seq needs prompt -> response data (alpaca, chat or prompt_completion), "
                              "not plain text")
        return splits

    def encode(self, template: Template, tokenizer: Any, rows: list[dict[str, Any]], cfg: Any, splits: Any) -> Encoded:
        return encode_seq2seq(template, rows, cfg.data.max_length)


def model_from_config(cfg: Any, hf_config: Any) -> nn.Module:
    """A randomly initialised model of ``cfg.task``'s class with the method attached (the head too, for
    seq_cls), from a transformers config: what ``peftkit info`` / ``peftkit memory`` count, on the meta device
    or not (the caller's device context applies)."""
    import transformers

    from peftkit.core.inject import inject
    from peftkit.models.builtin import _AUTO_CLASSES

    if cfg.task == "seq_cls":
        from peftkit.data.builtin import BUILTIN_DATASETS, label_options

        labels = label_options(cfg.data.train) if cfg.data.train in BUILTIN_DATASETS else None
        hf_config.num_labels = len(labels) if labels else 2  # a file's labels are only known once read
    model = getattr(transformers, _AUTO_CLASSES[cfg.task]).from_config(hf_config)
    inject(model, get_task(cfg.task).method_config(model, cfg.method_config()))
    return model


def get_task(name: str) -> CausalLMTask:
    """The task object for ``name``.

    Raises:
        ConfigError: unknown task.
    """
    tasks = {"causal_lm": CausalLMTask, "seq_cls": SeqClsTask, "seq2seq": Seq2SeqTask}
    if name not in tasks:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return tasks[name]()


# -- loading a trained model for evaluation ----------------------------------------------------------------------


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


__all__ = ["CLS_OBJECTIVE", "SEQ2SEQ_OBJECTIVE", "TASKS", "classification_accuracy", "detect_task", "evaluate_seq_cls",
           "get_task", "load_for_eval", "predict_classes", "with_head"]
