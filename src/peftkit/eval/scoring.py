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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.files import atomic_write_text
from peftkit.data.builtin import SPLITS
from peftkit.data.load import MIN_SPLIT_ROWS, Splits, load_splits
from peftkit.data.template import Template, reference
from peftkit.errors import ConfigError, DataError
from peftkit.eval import EVAL_TASKS
from peftkit.eval.classify import option_logprobs
from peftkit.eval.generate import generate
from peftkit.eval.icl import draw_shots, with_shots
from peftkit.eval.metrics import generation_metrics

TASKS = EVAL_TASKS
LETTERS = "ABCDEFGHIJ"


def load_model_with_adapter(model_name: str, adapter: str | None = None,
                            strict_base: bool = False) -> tuple[nn.Module, Any]:
    """The model (+ adapter) with the head of the task it was trained for: a causal LM, a sequence classifier
    (``task: seq_cls`` adapters and models) or an encoder-decoder."""
    from peftkit.models.load import load_for_eval

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
    test: str | None = None,
    log: Callable[[str], None] | None = None,
    per_example: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` of ``data`` (the first ``limit`` examples of a seeded shuffle).

    The test split of a user file is ``test`` (a file, scored whole) or else the rows training holds out of
    ``data`` (:func:`peftkit.data.load.load_splits`), never rows a run trained on; only a file too small to split
    is scored whole, and ``log`` (default: stderr) says which it was (also ``test_source`` in the result).
    Generation is scored against each example's own answer (:func:`peftkit.data.template.reference`); a shot
    never equals its query.

    ``transform`` rewrites every example (and shot) before it is rendered, e.g. to give it the task
    instruction a multi-task run trained with (:func:`peftkit.data.mixture.with_instruction`).

    Returns:
        ``{"task", "data", "split", "n", "shots", <metrics>...}`` (+ ``per_example``: each example's accuracy 1/0
        or ROUGE-L, when asked); per-example predictions go to ``predictions_file`` (JSONL) when given.
    """
    _check_task_and_split(task, split)
    if task == "perplexity" or (task == "auto" and Path(data).suffix == ".txt"):
        result = perplexity(model, tokenizer, data)
        return {"task": "perplexity", "data": data, **result}
    from peftkit.models.load import is_seq_cls

    if is_seq_cls(model):  # a classification head answers directly: accuracy of its arg-max class
        return _evaluate_head(model, tokenizer, data, task, split, limit, seed, batch_size, predictions_file, test)
    splits, task = _load_task(data, task, seed, test)
    tmpl = Template.create(tokenizer, template, splits.format)
    if task == "preference":
        return _evaluate_preference(model, tmpl, splits, data, split, limit, seed, batch_size)
    refs, queries = _queries(splits, data, split, limit, shots, seed, transform, log)
    out: dict[str, Any] = {"task": task, "data": data, "split": split, "n": len(queries), "shots": shots}
    if split == "test" and splits.test_source:
        out["test_source"] = splits.test_source
    preds, metrics = _predict(model, tmpl, task, queries, refs, splits, batch_size, max_new_tokens, seed)
    out.update(metrics)
    if per_example:  # each example's score, in query order: for intervals and paired tests (eval/stats.py)
        from peftkit.eval.metrics import per_example_scores

        out["per_example"] = per_example_scores("accuracy" if "accuracy" in metrics else "rougeL", preds, refs)
    if predictions_file is not None:
        _write_predictions(predictions_file, [{"prompt": tmpl.prompt_text(q), "reference": ref, "prediction": p}
                                              for q, ref, p in zip(queries, refs, preds)])
    return out


def _check_task_and_split(task: str, split: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be train, validation or test, got {split!r}")


def _evaluate_head(model: nn.Module, tokenizer: Any, data: str, task: str, split: str, limit: int | None, seed: int,
                   batch_size: int, predictions_file: str | Path | None, test: str | None) -> dict[str, Any]:
    """A sequence-classification model scored by its head: the accuracy of its arg-max class."""
    from peftkit.eval.heads import evaluate_seq_cls

    if task not in ("auto", "classification"):
        raise ConfigError(f"a sequence-classification model scores task classification, not {task!r}")
    res = evaluate_seq_cls(model, tokenizer, data, split, limit, seed, batch_size=batch_size, test=test)
    if predictions_file is not None:
        _write_predictions(predictions_file, [{"text": r["text"], "reference": r["label"], "prediction": p}
                                              for r, p in zip(res.pop("rows"), res.pop("predictions"))])
    return {k: v for k, v in res.items() if k not in ("rows", "predictions")}


def _queries(splits: Splits, data: str, split: str, limit: int | None, shots: int, seed: int,
             transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
             log: Callable[[str], None] | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The references and the queries (with their shots, after ``transform``) of the first ``limit`` rows of a
    seeded shuffle of ``split``; logs which rows a test split holds.

    Raises:
        DataError: no such split, or a row without an answer.
    """
    rows = list(getattr(splits, split))
    if not rows:
        raise DataError(f"{data!r} has no {split} split (give a file with data.test / --split train)")
    if split == "test" and splits.test_source:
        (log or _log_stderr)(f"{data}: {splits.test_source}")
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    refs = [_reference(r, i, data, split) for i, r in enumerate(rows)]
    shot_rows = [draw_shots(splits.train, shots, seed, options=splits.label_options, exclude=r) for r in rows]
    if transform is not None:
        rows, shot_rows = [transform(r) for r in rows], [[transform(s) for s in ss] for ss in shot_rows]
    return refs, [with_shots(r, ss) for r, ss in zip(rows, shot_rows)]


def _predict(model: nn.Module, tmpl: Template, task: str, queries: list[dict[str, Any]], refs: list[str],
             splits: Splits, batch_size: int, max_new_tokens: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """Each query's prediction, and the metrics: for classification the most likely label option (accuracy),
    else a generation scored against the references."""
    if task in ("classification", "multiple_choice"):
        options = splits.label_options or sorted({reference(r) for r in splits.train} | set(refs))
        scores = option_logprobs(model, tmpl, queries, options, batch_size)
        preds = [options[i] for i in scores.argmax(-1).tolist()]
        return preds, {"accuracy": sum(p == r for p, r in zip(preds, refs)) / len(refs)}
    preds = generate(model, tmpl, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    return preds, generation_metrics(preds, refs)


def _write_predictions(path: str | Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "\n".join(json.dumps(r) for r in records) + "\n")


def _reference(row: dict[str, Any], i: int, data: str, split: str) -> str:
    try:
        return reference(row)
    except DataError as e:
        raise DataError(f"{data}: {split} example {i}: {e}") from None


def _log_stderr(message: str) -> None:
    print(f"peftkit: {message}", file=sys.stderr)


def _load_task(data: str, task: str, seed: int, test: str | None = None) -> tuple[Splits, str]:
    """The splits, and the task kind resolved from ``auto``."""
    from peftkit.data.builtin import BUILTIN_DATASETS

    if data not in BUILTIN_DATASETS and _is_multiple_choice_file(data):
        splits = _multiple_choice_splits(data, seed)
        if test is not None:  # a dedicated test file of questions: scored whole, shots from ``data``
            splits.test, splits.test_source = _multiple_choice_splits(test, seed).test, f"test file {test}"
        return splits, "multiple_choice"
    splits = load_splits(data, test=test, fmt="auto", validation_fraction=0.0, seed=seed)
    if splits.format == "text":  # nothing to prompt with and no answer to compare: generation would start empty
        raise DataError(f"{data}: text-format rows (a 'text' field) have no prompt and answer to score; for the "
                        "perplexity of the text, give it as a .txt file (--data FILE.txt)")
    if not splits.test and data not in BUILTIN_DATASETS:
        splits.test = splits.train  # too small to split: the file is the thing to evaluate
        splits.test_source = (f"{len(splits.train)} rows, too few to hold out a test split (files under "
                              f"{MIN_SPLIT_ROWS} rows are not split): scoring every row, training rows for a model "
                              "trained on this file")
    if (task == "preference") != (splits.format == "preference") and task != "auto":
        raise DataError(f"{data}: --task {task} does not fit {splits.format}-format data")
    if task == "auto":
        task = "preference" if splits.format == "preference" else \
            "classification" if splits.label_options else "generation"
    return splits, task


def _evaluate_preference(model: nn.Module, tmpl: Template, splits: Splits, data: str, split: str, limit: int | None,
                         seed: int, batch_size: int) -> dict[str, Any]:
    """Preference accuracy on ``split`` (the first ``limit`` pairs of a seeded shuffle)."""
    import random

    from peftkit.eval.preference import preference_accuracy

    rows = list(getattr(splits, split))
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    out = {"task": "preference", "data": data, "split": split}
    if split == "test" and splits.test_source:
        out["test_source"] = splits.test_source
    return {**out, **preference_accuracy(model, tmpl, rows, batch_size=batch_size)}


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
    # an evaluation-only file: every question is scored, shots are other questions of the file (draw_shots)
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
    from peftkit.train.loss import lm_loss_sum
    from peftkit.train.precision import model_device

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
