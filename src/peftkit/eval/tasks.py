"""Evaluating a model (with or without an adapter) on a task: what ``peftkit eval`` calls.

Task kinds:
* ``classification``: pick the label option with the highest likelihood (built-in ``rotten-tomatoes``);
* ``multiple_choice``: MMLU's layout (``question``, ``choices`` or columns ``A``..``D``, ``answer`` as a
  letter or an index), scored as classification over the letters;
* ``generation``: free generation scored with exact match, token F1, ROUGE, BLEU and chrF (``chatterbot``);
* ``perplexity``: of a plain-text file, in sliding windows.
``shots`` > 0 adds k solved training examples in front of each query (the in-context baseline).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.files import atomic_write_text
from peftkit.data.load import Splits, load_splits
from peftkit.data.template import Template
from peftkit.errors import ConfigError, DataError
from peftkit.eval.classify import classify
from peftkit.eval.generate import generate
from peftkit.eval.icl import draw_shots, with_shots
from peftkit.eval.metrics import generation_metrics

TASKS = ("auto", "classification", "multiple_choice", "generation", "perplexity")
LETTERS = "ABCDEFGHIJ"


def load_model_with_adapter(model_name: str, adapter: str | None = None,
                            strict_base: bool = False) -> tuple[nn.Module, Any]:
    """The model (+ adapter) with the head of the task it was trained for: a causal LM, a sequence classifier
    (``task: seq_cls`` adapters and models) or an encoder-decoder."""
    from peftkit.train.tasks import load_for_eval

    return load_for_eval(model_name, adapter, strict_base)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: str = "rotten-tomatoes",
    task: str = "auto",
    split: str = "test",
    limit: int | None = None,
    shots: int = 0,
    template: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    predictions_file: str | Path | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` of ``data`` (the first ``limit`` examples of a seeded shuffle).

    ``transform`` rewrites every example (and shot) before it is rendered, e.g. to give it the task
    instruction a multi-task run trained with (:func:`peftkit.data.mixture.with_instruction`).

    Returns:
        ``{"task", "data", "split", "n", "shots", <metrics>...}``; per-example predictions go to
        ``predictions_file`` (JSONL) when given.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {split!r}")
    if task == "perplexity" or (task == "auto" and Path(data).suffix == ".txt"):
        result = perplexity(model, tokenizer, data)
        return {"task": "perplexity", "data": data, **result}
    from peftkit.train.tasks import evaluate_seq_cls, is_seq_cls

    if is_seq_cls(model):  # a classification head answers directly: accuracy of its arg-max class
        if task not in ("auto", "classification"):
            raise ConfigError(f"a sequence-classification model scores task classification, not {task!r}")
        res = evaluate_seq_cls(model, tokenizer, data, split, limit, seed, batch_size=batch_size)
        if predictions_file is not None:
            lines = [json.dumps({"text": r["text"], "reference": r["label"], "prediction": p})
                     for r, p in zip(res.pop("rows"), res.pop("predictions"))]
            atomic_write_text(predictions_file, "\n".join(lines) + "\n")
        return {k: v for k, v in res.items() if k not in ("rows", "predictions")}
    splits, task = _load_task(data, task, seed)
    rows = list(getattr(splits, split))
    if not rows:
        raise DataError(f"{data!r} has no {split} split (give a file with data.test / --split train)")
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    shot_rows = draw_shots(splits.train, shots, seed, options=splits.label_options) if shots else []
    if transform is not None:
        rows, shot_rows = [transform(r) for r in rows], [transform(r) for r in shot_rows]
    queries = [with_shots(r, shot_rows) for r in rows]
    tmpl = Template.create(tokenizer, template, splits.format)
    out: dict[str, Any] = {"task": task, "data": data, "split": split, "n": len(rows), "shots": shots}
    if task in ("classification", "multiple_choice"):
        options = splits.label_options or sorted({r["output"] for r in splits.train + rows})
        res = classify(model, tmpl, queries, options, "output", batch_size)
        out["accuracy"] = res.accuracy
        preds = res.predictions
    else:
        preds = generate(model, tmpl, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        refs = [tmpl.response_text(r) if "completion" in r else r.get("output", "") for r in rows]
        out.update(generation_metrics(preds, refs))
    if predictions_file is not None:
        lines = [json.dumps({"prompt": tmpl.prompt_text(q), "reference": r.get("output", r.get("completion")),
                             "prediction": p}) for q, r, p in zip(queries, rows, preds)]
        atomic_write_text(predictions_file, "\n".join(lines) + "\n")
    return out


def _load_task(data: str, task: str, seed: int) -> tuple[Splits, str]:
    """The splits, and the task kind resolved from ``auto``."""
    from peftkit.data.builtin import BUILTIN_DATASETS

    if data not in BUILTIN_DATASETS and _is_multiple_choice_file(data):
        return _multiple_choice_splits(data, seed), "multiple_choice"
    splits = load_splits(data, fmt="auto", validation_fraction=0.0, seed=seed)
    if not splits.test and data not in BUILTIN_DATASETS:
        splits.test = splits.train  # a user file is the thing to evaluate
    if task == "auto":
        task = "classification" if splits.label_options else "generation"
    return splits, task


def _is_multiple_choice_file(path: str) -> bool:
    from peftkit.data.formats import read_records

    if not Path(path).is_file() or Path(path).suffix.lower() == ".txt":
        return False
    rows, _ = read_records(path)
    return "question" in rows[0] and "answer" in rows[0]


def _multiple_choice_splits(path: str, seed: int) -> Splits:
    from peftkit.data.formats import read_records

    rows, where = read_records(path)
    converted = [_mc_row(r, w) for r, w in zip(rows, where)]
    n_choices = max(len(c) for _, c in converted)
    letters = list(LETTERS[:n_choices])
    examples = [{"instruction": "Answer the multiple-choice question with the letter of the correct choice.",
                 "input": ex["input"], "output": ex["output"]} for ex, _ in converted]
    return Splits(train=examples, test=examples, format="alpaca", label_options=letters)


def _mc_row(row: dict[str, Any], where: str) -> tuple[dict[str, str], list[str]]:
    choices = row.get("choices")
    if choices is None:
        choices = [row[c] for c in LETTERS if c in row]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of 2-{len(LETTERS)} strings (or columns A, B, C, D)")
    answer = row.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        letter = LETTERS[answer]
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)]:
        letter = answer.strip().upper()
    else:
        raise DataError(f"{where}: 'answer' must be a letter A-{LETTERS[len(choices) - 1]} or an index, got {answer!r}")
    if not isinstance(row.get("question"), str):
        raise DataError(f"{where}: 'question' must be a string")
    body = row["question"] + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
    return {"input": body, "output": letter}, choices


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, path: str, window: int = 512, stride: int = 256,
               max_tokens: int | None = None) -> dict[str, float]:
    """Perplexity of a text file: windows of ``window`` tokens advancing by ``stride``; each token is
    scored once, with up to ``window - stride`` tokens of context before it."""
    from peftkit.train.loop import lm_loss_sum, model_device

    file = Path(path)
    if not file.is_file():
        raise DataError(f"text file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: max_tokens or None]
    if len(ids) < 2:
        raise DataError(f"{file}: too little text to measure perplexity")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count, scored_to = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        chunk = torch.tensor([ids[begin:end]], device=device)
        labels = chunk.clone()
        labels[0, : max(scored_to - begin, 0)] = -100  # context only: already scored in the previous window
        loss, n = lm_loss_sum(model, {"input_ids": chunk, "labels": labels})
        total, count, scored_to = total + float(loss), count + n, end
        if end == len(ids):
            break
    model.train(was_training)
    return {"perplexity": math.exp(total / count), "nll_per_token": total / count, "tokens": count}


def evaluate_classification(model: nn.Module, tokenizer: Any, data: str = "rotten-tomatoes", split: str = "test",
                            limit: int | None = None, **kw: Any) -> dict[str, Any]:
    """``evaluate`` for a classification task (accuracy)."""
    return evaluate(model, tokenizer, data, "classification", split, limit, **kw)
