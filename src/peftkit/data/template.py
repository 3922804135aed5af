"""The prompt template: one object turns an example into prompt and response tokens for training,
generation and evaluation alike (a train/inference format mismatch is a classic "the fine-tune did
nothing" bug, so there is exactly one place that renders prompts).

Kinds:
* ``chat``: the tokenizer's own chat template (instruct models such as SmolLM2-Instruct);
* ``alpaca``: the Alpaca text layout (``### Instruction:`` / ``### Input:`` / ``### Response:``);
* ``none``: prompt and completion joined as they are (``prompt_completion`` and ``text`` data always use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.errors import ConfigError

KINDS = ("auto", "chat", "alpaca", "none")


@dataclass
class Template:
    """Renders examples for one tokenizer.

    Attributes:
        kind: "chat", "alpaca" or "none" (resolved; never "auto").
        tokenizer: a Hugging Face tokenizer.
    """

    kind: str
    tokenizer: Any

    @classmethod
    def create(cls, tokenizer: Any, kind: str = "auto", data_format: str = "alpaca") -> Template:
        """Pick the template: raw formats take none; ``auto`` takes chat when the tokenizer has one."""
        if kind not in KINDS:
            raise ConfigError(f"data.template must be one of {', '.join(KINDS)}, got {kind!r}")
        if data_format in ("prompt_completion", "text"):
            return cls("none", tokenizer)
        if kind == "auto":
            kind = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template is 'chat' but the tokenizer has no chat template; use alpaca or none")
        if data_format == "chat" and kind != "chat":
            raise ConfigError("chat-format data (messages) needs data.template chat (a tokenizer with a chat template)")
        return cls(kind, tokenizer)

    # -- text ------------------------------------------------------------------------------
    def prompt_text(self, example: dict[str, Any]) -> str:
        """Everything before the response (for chat: up to and including the assistant header)."""
        if "text" in example and "prompt" not in example and "instruction" not in example and "messages" not in example:
            return ""
        if "prompt" in example:
            return example["prompt"]
        if self.kind == "chat":
            return self.tokenizer.apply_chat_template(to_messages(example)[:-1], tokenize=False, add_generation_prompt=True)
        if self.kind == "alpaca":
            return _alpaca_prompt(example)
        return "\n".join(p for p in (example.get("instruction", ""), example.get("input", "")) if p) + "\n"

    def response_text(self, example: dict[str, Any]) -> str:
        """The target text; for chat it includes the template's end-of-turn marker."""
        if "completion" in example:
            return example["completion"]
        if "text" in example and "instruction" not in example and "messages" not in example:
            return example["text"]
        if self.kind == "chat":
            messages = to_messages(example)
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if full.startswith(prompt):
                return full[len(prompt):]
            return messages[-1]["content"]
        return example["messages"][-1]["content"] if "messages" in example else example["output"]

    # -- tokens ----------------------------------------------------------------------------
    def prompt_ids(self, example: dict[str, Any]) -> list[int]:
        text = self.prompt_text(example)
        # chat templates write their own special tokens; raw text gets the tokenizer's BOS (if it uses one)
        ids = self.tokenizer(text, add_special_tokens=self.kind != "chat")["input_ids"]
        return list(ids)

    def response_ids(self, text: str) -> list[int]:
        """Tokens of a response, ending with the end marker the model must learn to emit."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.kind != "chat" and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def stop_token_ids(self) -> list[int]:
        """Tokens that end a generated response."""
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok) if tok in self.tokenizer.get_vocab() else None
            if tid is not None:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)


def with_response(example: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of ``example`` whose response is ``text`` (used to score candidate answers)."""
    if "messages" in example:
        messages = list(example["messages"])
        messages[-1] = {**messages[-1], "content": text}
        return {**example, "messages": messages}
    return {**example, ("completion" if "completion" in example else "output"): text}


def user_example(prompt: str, system: str | None = None) -> dict[str, Any]:
    """An alpaca-style example for a free prompt typed by a user (``peftkit generate``)."""
    ex = {"instruction": prompt, "input": "", "output": ""}
    if system:
        ex["system"] = system
    return ex


def to_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """The example as a chat: [system], user, assistant (the assistant turn holds the response)."""
    if "messages" in example:
        return example["messages"]
    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    msgs = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": example.get("output", "")}]


def _alpaca_prompt(example: dict[str, Any]) -> str:
    if "messages" in example:  # multi-turn data in the alpaca layout
        parts = []
        for m in example["messages"][:-1]:
            header = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}[m["role"]]
            parts.append(header + m["content"])
        return "\n\n".join(parts) + "\n\n### Response:\n"
    head = (example["system"] + "\n\n") if example.get("system") else ""
    if example.get("input"):
        return f"{head}### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n### Response:\n"
    return f"{head}### Instruction:\n{example['instruction']}\n\n### Response:\n"
