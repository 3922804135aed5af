"""Turning examples into token ids and labels (loss on the response unless told otherwise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.data.template import Template

IGNORE = -100  # label value the loss skips (PyTorch cross_entropy's ignore_index)
_KEEP_PROMPT_TAIL = 16  # tokens kept from a truncated prompt's end (chat templates end with the assistant header)


@dataclass
class Encoded:
    """Tokenized examples, plus what truncation did to them."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def encode_example(template: Template, example: dict[str, Any], max_length: int, train_on_prompt: bool = False) -> tuple[dict[str, list[int]], bool]:
    """``{"input_ids", "labels"}`` for one example, and whether it had to be truncated.

    Truncation keeps the response (at least half of the budget when the prompt is long), then the
    prompt's head and its last few tokens, so the instruction and the assistant header both survive.
    """
    prompt = template.prompt_ids(example)
    response = template.response_ids(template.response_text(example))
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        response = response[: max(max_length - len(prompt), max_length // 2)]
        budget = max_length - len(response)
        if len(prompt) > budget:
            tail = min(_KEEP_PROMPT_TAIL, budget // 2)
            prompt = prompt[: budget - tail] + (prompt[len(prompt) - tail:] if tail else [])
    labels = (list(prompt) if train_on_prompt else [IGNORE] * len(prompt)) + response
    return {"input_ids": prompt + response, "labels": labels}, truncated


def encode_all(template: Template, examples: list[dict[str, Any]], max_length: int, train_on_prompt: bool = False) -> Encoded:
    """Encode a list of examples; those left with no label to learn from are dropped and counted."""
    out = Encoded()
    for ex in examples:
        enc, was_truncated = encode_example(template, ex, max_length, train_on_prompt)
        out.truncated += was_truncated
        if all(t == IGNORE for t in enc["labels"]):
            out.dropped += 1
            continue
        out.examples.append(enc)
    return out
