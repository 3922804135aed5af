"""EleutherAI's lm-evaluation-harness over any peftkit model and adapter (``pip install lm-eval``, optional).

:class:`PeftkitLM` is lm-eval's ``LM`` (its three request types) over the model as peftkit runs it, so every method
counts, soft prompts included (their virtual positions are dropped from the logits, as in training). Log-likelihoods
follow lm-eval's ``HFLM``: the context's trailing spaces move to the continuation, the pair is encoded whole and split
at the context's length, an empty context starts from the BOS (else EOS) token, and inputs keep their last
``max_length`` tokens. Rolling log-likelihoods use lm-eval's own disjoint windows.

Tasks run offline from local JSONL files (``dataset_path: json``); two ship with peftkit, made from the built-in
data on first use (``peftkit_rotten_tomatoes``: sentiment as multiple choice; ``peftkit_hamlet``: rolling perplexity
of general text, the forgetting measure). :func:`harness_report` scores the adapter and its base side by side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.errors import ConfigError

SHIPPED_TASKS = ("peftkit_rotten_tomatoes", "peftkit_hamlet")


def _lm_base() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError("the lm-eval bridge needs lm-evaluation-harness: pip install lm-eval") from None
    return LM


def make_lm(model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
            max_gen_toks: int = 64) -> Any:
    """A :class:`PeftkitLM` (an ``lm_eval.api.model.LM``) over ``model``."""

    class PeftkitLM(_lm_base()):  # subclassed at call time: lm-eval is optional
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch_size = model, tokenizer, batch_size
            self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048))
            self.max_gen_toks = max_gen_toks
            self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return score_pairs(self.model, [self._pair(*r.args) for r in requests], self.max_length, self.batch_size,
                               self.tok)

        def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for r in requests:
                ids = self.tok(r.args[0], add_special_tokens=False)["input_ids"]
                windows = [make_disjoint_window(w) for w in
                           get_rolling_token_windows(ids, self.prefix_id, self.max_length, 1)]
                out.append(sum(lp for lp, _ in score_pairs(self.model, windows, self.max_length, self.batch_size,
                                                           self.tok)))
            return out

        def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
            return [generate_until(self.model, self.tok, ctx, dict(kw), self.max_gen_toks) for ctx, kw in
                    (r.args for r in requests)]

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                return [self.prefix_id], self.tok(continuation, add_special_tokens=False)["input_ids"]
            whole = self.tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = self.tok(context, add_special_tokens=False)["input_ids"]
            return whole[: len(ctx)], whole[len(ctx):]

    return PeftkitLM()


@torch.no_grad()
def score_pairs(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], max_length: int, batch_size: int,
                tokenizer: Any) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy one)`` per ``(context, continuation)``
    token pair; each input keeps its last ``max_length`` tokens."""
    from peftkit.train.precision import model_device

    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits[:, -width:]  # soft prompts prepend virtual positions
        for j, i in enumerate(idx):
            cont = pairs[i][1]
            end = len(rows[j])
            logp = F.log_softmax(logits[j, end - len(cont): end].float(), dim=-1)  # (len(cont), V)
            target = torch.tensor(cont, device=logp.device)
            results[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    model.train(was_training)
    return results


@torch.no_grad()
def generate_until(model: nn.Module, tokenizer: Any, context: str, kwargs: dict[str, Any], max_gen_toks: int) -> str:
    """The continuation of ``context`` up to (not including) the first of ``kwargs["until"]``."""
    from peftkit.train.precision import model_device

    until = kwargs.pop("until", None) or [tokenizer.decode([tokenizer.eos_token_id])]
    until = [until] if isinstance(until, str) else list(until)
    limit = int(kwargs.pop("max_gen_toks", max_gen_toks))
    sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 0.0)) > 0
    extra = {"do_sample": True, "temperature": float(kwargs["temperature"]),
             "top_p": float(kwargs.get("top_p", 1.0))} if sample else {"do_sample": False}
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    device = model_device(model)
    model.eval()
    out = model.generate(input_ids=torch.tensor([ids], device=device),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device), max_new_tokens=limit,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                         tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


# -- tasks and the report ------------------------------------------------------------------------------------------
def shipped_task_dir() -> Path:
    """A folder of the shipped task YAMLs and their JSONL data (written once under peftkit's cache)."""
    from peftkit.core.files import file_lock
    from peftkit.models.builtin import cache_dir

    folder = cache_dir() / "harness-tasks-v1"
    if (folder / "done").is_file():
        return folder
    with file_lock(folder.parent / ".harness-tasks.lock"):
        if not (folder / "done").is_file():  # another process may have written it meanwhile
            _write_tasks(folder)
    return folder


def _write_tasks(folder: Path) -> None:
    import json

    from peftkit.core.files import atomic_dir
    from peftkit.data.builtin import general_text_path, load_builtin

    with atomic_dir(folder) as tmp:
        rows = load_builtin("rotten-tomatoes")["test"]
        lines = [json.dumps({"text": r["input"], "label": int(r["output"] == "positive")}) for r in rows]
        (tmp / "rotten_tomatoes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paragraphs = [p.strip() for p in general_text_path().read_text(encoding="utf-8").split("\n\n") if p.strip()]
        chunks, cur = [], ""
        for p in paragraphs:  # documents of ~2,000 characters
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) > 2000:
                chunks.append(cur)
                cur = ""
        (tmp / "hamlet.jsonl").write_text("\n".join(json.dumps({"text": c}) for c in chunks) + "\n", encoding="utf-8")
        for name, body in _TASK_YAML.items():
            (tmp / f"{name}.yaml").write_text(body.replace("DATA", str(folder)), encoding="utf-8")
        (tmp / "done").write_text("")


_TASK_YAML = {
    "peftkit_rotten_tomatoes": """task: peftkit_rotten_tomatoes
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA/rotten_tomatoes.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{text}}\\nSentiment:"
doc_to_choice: [" negative", " positive"]
target_delimiter: ""
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "peftkit_hamlet": """task: peftkit_hamlet
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA/hamlet.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}


def run_tasks(lm: Any, tasks: Sequence[str], include: Sequence[str | Path] = (), limit: int | None = None) -> dict:
    """``{task: {metric: value}}`` from lm-eval's ``simple_evaluate`` (shipped tasks + ``include`` folders)."""
    from lm_eval import simple_evaluate

    manager = _task_manager(tuple(map(str, include)), defaults=False)  # lm-eval's own index takes ~12 s to build
    if any(t not in manager.all_tasks for t in tasks):
        manager = _task_manager(tuple(map(str, include)), defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not shipped ({', '.join(SHIPPED_TASKS)}), "
                          "not in --harness-include folders, not lm-eval's")
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
            for task, values in res["results"].items()}


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(shipped_task_dir()), *include], include_defaults=defaults)


def harness_report(model: nn.Module, tokenizer: Any, tasks: Sequence[str], include: Sequence[str | Path] = (),
                   limit: int | None = None, base: Any = None, batch_size: int = 8) -> dict[str, Any]:
    """The tasks scored for the adapter and for its base (adapters off, or ``base`` for in-place methods), and
    the gap per metric (adapter - base)."""
    from peftkit.eval.forgetting import base_of

    with base_of(model, base) as (base_model, how):
        before = run_tasks(make_lm(base_model, tokenizer, batch_size), tasks, include, limit)
    after = run_tasks(make_lm(model, tokenizer, batch_size), tasks, include, limit)
    rows = {task: {m: {"base": before[task][m], "adapter": v, "gap": v - before[task][m]}
                   for m, v in metrics.items() if m in before.get(task, {})} for task, metrics in after.items()}
    return {"tasks": rows, "base_from": how, "limit": limit}
