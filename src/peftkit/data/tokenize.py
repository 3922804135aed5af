"""Turning examples into token ids and labels (loss on the response unless told otherwise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.core.labels import IGNORE
from peftkit.data.template import Template

_KEEP_PROMPT_TAIL = 16  # tokens kept from a truncated prompt's end (chat templates end with the assistant header)


@dataclass
class Encoded:
    """Tokenized examples, plus what truncation did to them."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def encode_example(template: Template, example: dict[str, Any], max_length: int, train_on_prompt: bool = False,
                   chat_loss: str = "all") -> tuple[dict[str, list[int]], bool]:
    """``{"input_ids", "labels"}`` for one example, and whether it had to be truncated.

    Chat conversations are labelled on their assistant turns (``chat_loss``: ``all`` of them or the ``last``;
    never a ``weight: 0`` one), each piece tokenized on its own as :meth:`Template.chat_segments` cuts it, so a
    turn's tokens are exactly those generation would produce after the same prompt.

    Truncation keeps the response (from the last trained turn on; at least half of the budget when the prompt
    is long), then the prompt's head and its last few tokens, so the instruction and the assistant header both
    survive.
    """
    if template.kind == "chat" and "messages" in example:
        ids, trained = [], []
        for text, is_target in template.chat_segments(example, chat_loss):
            # the template writes its own special tokens; a turn's end marker is part of its text
            piece = list(template.tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += piece
            trained += [is_target] * len(piece)
        cut = _last_run_start(trained)
        prompt, response = ids[:cut], ids[cut:]
        prompt_mask, response_mask = trained[:cut], trained[cut:]
    else:
        prompt = template.prompt_ids(example)
        response = template.response_ids(template.response_text(example))
        prompt_mask, response_mask = [False] * len(prompt), [True] * len(response)
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        keep = max(max_length - len(prompt), max_length // 2)
        response, response_mask = response[:keep], response_mask[:keep]
        budget = max_length - len(response)
        if len(prompt) > budget:
            tail = min(_KEEP_PROMPT_TAIL, budget // 2)
            head = budget - tail
            prompt = prompt[:head] + (prompt[len(prompt) - tail:] if tail else [])
            prompt_mask = prompt_mask[:head] + (prompt_mask[len(prompt_mask) - tail:] if tail else [])
    ids, mask = prompt + response, prompt_mask + response_mask
    labels = list(ids) if train_on_prompt else [t if m else IGNORE for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}, truncated


def _last_run_start(mask: list[bool]) -> int:
    """Where the last run of ``True`` starts (``len(mask)`` when there is none): the response of a chat."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    if not end:
        return len(mask)
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start


def encode_all(template: Template, examples: list[dict[str, Any]], max_length: int, train_on_prompt: bool = False,
               chat_loss: str = "all") -> Encoded:
    """Encode a list of examples; those left with no label to learn from are dropped and counted."""
    out = Encoded()
    for ex in examples:
        enc, was_truncated = encode_example(template, ex, max_length, train_on_prompt, chat_loss)
        out.truncated += was_truncated
        if all(t == IGNORE for t in enc["labels"]):
            out.dropped += 1
            continue
        out.examples.append(enc)
    return out
