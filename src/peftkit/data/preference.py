"""Preference pairs: one prompt, a ``chosen`` answer and a ``rejected`` one (DPO and friends).

Accepted rows (detected like the other formats, :func:`is_preference`):

* TRL's: ``prompt`` / ``chosen`` / ``rejected``, each a string ("standard") or a list of chat messages
  ("conversational": the prompt's messages, and the answers as a list holding one assistant message);
* OpenAI's preference fine-tuning JSONL: ``input.messages``, ``preferred_output`` and ``non_preferred_output``
  (each a list holding one assistant message).

Every row becomes ``{"messages": prompt messages, "chosen": str, "rejected": str}``; a string prompt is one user
message. The pair is then rendered with the same template as supervised fine-tuning (:func:`encode_pair`): the
prompt as a conversation ending with the assistant header, each answer as the assistant's turn, so an adapter
trained on preferences generates with ``peftkit generate`` as it trained.
"""

from __future__ import annotations

from typing import Any

from peftkit.core.labels import IGNORE
from peftkit.data.template import Template
from peftkit.errors import DataError

PREFERENCE_KEYS = ("chosen", "rejected", "preferred_output", "non_preferred_output")


def is_preference(row: dict[str, Any]) -> bool:
    return any(key in row for key in PREFERENCE_KEYS)


def normalize_pair(row: dict[str, Any], loc: str) -> dict[str, Any]:
    """``{"messages", "chosen", "rejected"}`` of a TRL or OpenAI preference row.

    Raises:
        DataError: naming the row: a missing or empty field, an answer that is not one assistant message or
            a string, chosen identical to rejected.
    """
    if "preferred_output" in row or "non_preferred_output" in row:
        inp = row.get("input")
        if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list) or not inp["messages"]:
            raise DataError(f"{loc}: field 'input' must be {{'messages': [...]}} with at least one message")
        prompt = _messages(inp["messages"], f"{loc}: input.messages")
        chosen = _answer(row.get("preferred_output"), f"{loc}: preferred_output")
        rejected = _answer(row.get("non_preferred_output"), f"{loc}: non_preferred_output")
    else:
        for key in ("prompt", "chosen", "rejected"):
            if row.get(key) is None:
                raise DataError(f"{loc}: missing field {key!r} (preference data: prompt, chosen, rejected)")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{loc}: field 'prompt' is empty")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, f"{loc}: prompt")
        chosen, rejected = _answer(row["chosen"], f"{loc}: chosen"), _answer(row["rejected"], f"{loc}: rejected")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{loc}: the prompt ends with an assistant message; the answers are the assistant's turn")
    if chosen == rejected:
        raise DataError(f"{loc}: chosen and rejected are the same answer; a pair must differ")
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    from peftkit.data.formats import ROLES

    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{j}] must be {{'role': {'|'.join(ROLES)}, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, where: str) -> str:
    """A string, or a list holding one assistant message (TRL's conversational and OpenAI's form)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant" \
                or not isinstance(value[0].get("content"), str):
            raise DataError(f"{where} must be a string or [{{'role': 'assistant', 'content': str}}]")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string or [{{'role': 'assistant', 'content': str}}]")
    if not value.strip():
        raise DataError(f"{where} is empty")
    return value


def encode_pair(template: Template, pair: dict[str, Any], max_length: int) -> tuple[dict[str, list[int]], bool]:
    """One example holding both sequences: ``input_ids``/``labels`` (prompt + chosen) and
    ``rejected_input_ids``/``rejected_labels`` (prompt + rejected), labelled on the answer only; and whether
    either was truncated."""
    from peftkit.data.tokenize import encode_example

    out: dict[str, list[int]] = {}
    truncated = False
    for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
        enc, cut = encode_example(template, _sft_example(template, pair, pair[side]), max_length, chat_loss="last")
        out[f"{prefix}input_ids"], out[f"{prefix}labels"] = enc["input_ids"], enc["labels"]
        truncated |= cut
    return out, truncated


def _sft_example(template: Template, pair: dict[str, Any], answer: str) -> dict[str, Any]:
    """The supervised example the pair's side is: a chat for a chat template, else instruction -> output."""
    if template.kind == "chat":
        return {"messages": [*pair["messages"], {"role": "assistant", "content": answer}]}
    system = "\n".join(m["content"] for m in pair["messages"] if m["role"] == "system")
    turns = "\n".join(m["content"] for m in pair["messages"] if m["role"] != "system")
    if template.kind == "none":
        return {"prompt": turns, "completion": answer}
    return {"instruction": turns, "output": answer, **({"system": system} if system else {})}


def has_labels(example: dict[str, list[int]]) -> bool:
    """Both answers kept at least one labelled token."""
    return any(t != IGNORE for t in example["labels"]) and any(t != IGNORE for t in example["rejected_labels"])
