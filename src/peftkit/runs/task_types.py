"""Task types: what a run trains the model *to do*, independent of the method that chooses what trains.

* ``causal_lm`` — next-token prediction on prompt + response (the default; ``AutoModelForCausalLM``).
* ``seq_cls`` — sequence classification: ``AutoModelForSequenceClassification`` with one output per label
  of the data, cross-entropy on the head's logits. The head (``classifier`` on BERT, ``score`` on Llama:
  PEFT's names) trains besides the method's own parameters and is saved with the adapter exactly as PEFT's
  ``modules_to_save`` does: file keys ``base_model.model.classifier.weight``, config field
  ``modules_to_save``, ``task_type`` ``SEQ_CLS``. Accuracy on the test split is scored at the end of a run.
* ``seq2seq`` — encoder-decoder LM (T5): the prompt is the encoder's input, the response the decoder's
  labels (the model shifts them right itself), cross-entropy over the response tokens.

Each task gives the training loop an :class:`~peftkit.train.loss.Objective` (loss and batching); the loop
itself never looks at the task or the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftkit.core.config import MethodConfig
from peftkit.core.targeting import classification_head_names
from peftkit.data.classification import ClassificationSplits, encode_classification, load_classification
from peftkit.data.load import Splits, load_splits
from peftkit.data.template import Template
from peftkit.data.tokenize import Encoded, encode_all
from peftkit.errors import ConfigError
from peftkit.eval.heads import classification_accuracy
from peftkit.models.builtin import TASK_TYPES
from peftkit.models.load import set_label_names, write_labels
from peftkit.train.loss import CLS_OBJECTIVE, LM_OBJECTIVE, SEQ2SEQ_OBJECTIVE, Objective

TASKS = TASK_TYPES


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
    current = list(method_cfg.modules_to_save or [])
    return dataclasses.replace(method_cfg, modules_to_save=current + [h for h in heads if h not in current])


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
        if getattr(splits, "format", None) == "preference":  # pairs: both answers after one prompt
            from peftkit.runs.preference import encode_pairs

            return encode_pairs(template, rows, cfg.data.max_length)
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
