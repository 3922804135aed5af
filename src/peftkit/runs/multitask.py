"""Multi-task runs: ``data.tasks`` turned into one training set, a task-mixing batch order, and one
validation set per task (what :func:`peftkit.runs.run.train_run` hands the trainer).

Each task brings its own data, format, template and instruction; the trainer sees one concatenated list
of tokenized examples (task ``t`` at ``offsets[t]:offsets[t] + sizes[t]``) and a batch order from
:mod:`peftkit.data.mixture` that decides which task each example comes from.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from peftkit.data.collate import Example
from peftkit.data.load import Splits, load_splits
from peftkit.data.mixture import MixedOrder, SequentialOrder, with_instruction
from peftkit.data.template import Template
from peftkit.data.tokenize import Encoded, encode_all
from peftkit.errors import ConfigError, DataError, PeftkitError
from peftkit.runs.config import RunConfig, TaskConfig


@dataclass
class Task:
    """One task, loaded: its (resolved) settings, records, template and tokenized examples."""

    index: int
    config: TaskConfig
    splits: Splits
    template: Template
    train: Encoded
    val: Encoded

    @property
    def name(self) -> str:
        return self.config.name

    def where(self) -> str:
        return f"data.tasks[{self.index}] ({self.name})"

    def prepare_example(self, example: dict[str, Any]) -> dict[str, Any]:
        """The example as the task presents it (with the task instruction, if any)."""
        if self.config.instruction is None:
            return example
        return with_instruction(example, self.config.instruction, self.where())


@dataclass
class MultiTask:
    """Everything the trainer needs for a multi-task run."""

    tasks: list[Task]
    mix: str
    order: MixedOrder | SequentialOrder
    steps: list[int] | None  # sequential: optimizer steps per task

    @property
    def train(self) -> Encoded:
        """All tasks' training examples, concatenated in task order (with their truncation counts)."""
        return _concat([t.train for t in self.tasks])

    @property
    def val(self) -> Encoded:
        return _concat([t.val for t in self.tasks])

    def trainer_kwargs(self) -> dict[str, Any]:
        """``batch_order`` and ``val_sets`` for :class:`peftkit.train.loop.Trainer`."""
        return {"batch_order": self.order, "val_sets": {t.name: t.val.examples for t in self.tasks}}

    def describe(self) -> list[str]:
        """One log line per task, and how they are combined."""
        lines = []
        for i, t in enumerate(self.tasks):
            share = (f"steps {sum(self.steps[:i]) + 1}-{sum(self.steps[:i + 1])}" if self.steps is not None
                     else f"p={self.order.probs[i]:.3f}")
            lines.append(f"task {t.name}: {len(t.train.examples)} train / {len(t.val.examples)} validation examples, "
                         f"template {t.template.kind}, {share}"
                         + (f", instruction {t.config.instruction!r}" if t.config.instruction else ""))
        return [f"multi-task ({self.mix}): {len(self.tasks)} tasks", *lines]

    def summary(self) -> list[dict[str, Any]]:
        """Per task: name, data, examples, and its sampling probability or steps (for run_summary.json)."""
        out = []
        for i, t in enumerate(self.tasks):
            row = {"name": t.name, "train": t.config.train, "train_examples": len(t.train.examples),
                   "validation_examples": len(t.val.examples), "template": t.template.kind}
            row.update({"steps": self.steps[i]} if self.steps is not None else {"probability": self.order.probs[i]})
            out.append(row)
        return out


def build_tasks(cfg: RunConfig, tokenizer: Any, world_size: int = 1) -> MultiTask:
    """Load, instruct and tokenize every task of ``cfg.data.tasks``, and build the batch order.

    Raises:
        DataError / ConfigError: naming the task (``data.tasks[1] (chat): ...``).
    """
    tasks = [_load_task(cfg, i, tokenizer) for i in range(len(cfg.data.tasks))]
    sizes = [len(t.train.examples) for t in tasks]
    lengths = [len(e["input_ids"]) for t in tasks for e in t.train.examples]
    d, tc = cfg.data, cfg.train
    size = tc.batch_size * world_size
    budget = size * d.max_length if d.packing else None
    if d.mix == "sequential":
        steps = cfg.task_steps()
        order = SequentialOrder(sizes, lengths, steps, size, tc.grad_accum, tc.seed, d.group_by_length, budget)
        return MultiTask(tasks, d.mix, order, steps)
    order = MixedOrder(sizes, lengths, [t.config.weight for t in tasks], size, tc.seed, d.temperature,
                       d.group_by_length, budget)
    return MultiTask(tasks, d.mix, order, None)


def _load_task(cfg: RunConfig, index: int, tokenizer: Any) -> Task:
    d, seed = cfg.data, cfg.train.seed
    tc = d.tasks[index]
    where = f"data.tasks[{index}] ({tc.name})"
    try:
        splits = load_splits(tc.train, tc.validation, tc.test, tc.format or d.format, d.validation_fraction, seed)
        template = Template.create(tokenizer, tc.template or d.template, splits.format)
    except (DataError, ConfigError) as e:
        raise type(e)(f"{where}: {e}") from None
    task = Task(index, tc, splits, template, Encoded(), Encoded())
    train_rows = list(splits.train)
    limit = tc.max_train_examples or d.max_train_examples
    if limit:
        random.Random(seed).shuffle(train_rows)
        train_rows = train_rows[:limit]
    val_rows = splits.validation[: d.max_validation_examples] if d.max_validation_examples else splits.validation
    task.train = encode_all(template, [task.prepare_example(r) for r in train_rows], d.max_length, d.train_on_prompt,
                            d.chat_loss)
    task.val = encode_all(template, [task.prepare_example(r) for r in val_rows], d.max_length, d.train_on_prompt,
                            d.chat_loss)
    if not task.train.examples:
        raise ConfigError(f"{where}: no training example is left after tokenization (all responses truncated away?)")
    return task


def _concat(parts: list[Encoded]) -> Encoded:
    examples: list[Example] = [e for p in parts for e in p.examples]
    return Encoded(examples, sum(p.truncated for p in parts), sum(p.dropped for p in parts))


# -- test metrics after training --------------------------------------------------------------------


def task_test_metrics(model: nn.Module, tokenizer: Any, cfg: RunConfig, log=print) -> dict[str, dict[str, Any]]:
    """Each task's test metric on the final model: ``{task name: {"metric", "value", "n", <all metrics>}}``.

    Tasks are ``data.tasks`` (each with its template and instruction), or ``data.train`` in a one-task run.
    Only tasks with a test split are scored (built-in datasets, or a ``test`` file); others are skipped.
    """
    from peftkit.data.builtin import BUILTIN_DATASETS
    from peftkit.eval.scoring import evaluate

    tasks = cfg.data.tasks or [TaskConfig(name=_default_name(cfg.data.train), train=cfg.data.train,
                                          test=cfg.data.test, format=cfg.data.format)]
    out: dict[str, dict[str, Any]] = {}
    for i, tc in enumerate(tasks):
        if tc.test is None and tc.train not in BUILTIN_DATASETS:
            log(f"task metrics: {tc.name} has no test split (give it a test file); skipped")
            continue
        transform = None
        if tc.instruction is not None:
            transform = functools.partial(with_instruction, instruction=tc.instruction, where=f"data.tasks[{i}]")
        try:
            res = evaluate(model, tokenizer, tc.train, split="test", limit=cfg.eval.limit, test=tc.test,
                           template=tc.template or cfg.data.template, seed=cfg.train.seed, transform=transform, log=log)
        except PeftkitError as e:
            raise type(e)(f"task metrics of {tc.name}: {e}") from None
        metric = "accuracy" if "accuracy" in res else "rougeL"
        out[tc.name] = {"metric": metric, "value": res[metric], **res}
        log(f"task {tc.name}: {metric} {res[metric]:.4f} on {res['n']} test examples")
    return out


def _default_name(train: str) -> str:
    from peftkit.runs.config import _default_task_name

    return _default_task_name(train)


__all__ = ["MultiTask", "Task", "build_tasks", "task_test_metrics"]
