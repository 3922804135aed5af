"""The prompt template: one object turns an example into prompt and response tokens for training,
generation and evaluation alike (a train/inference format mismatch is a classic "the fine-tune did
nothing" bug, so there is exactly one place that renders prompts).

Kinds:
* ``chat``: the tokenizer's own chat template (instruct models such as SmolLM2-Instruct);
* ``alpaca``: the Alpaca text layout (``### Instruction:`` / ``### Input:`` / ``### Response:``);
* ``none``: prompt and completion joined as they are (``prompt_completion`` and ``text`` data always use it).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

from peftkit.errors import ConfigError, DataError

#: the template choices (``data.template``, ``--template``): ``auto`` resolves to chat or alpaca in :meth:`Template.create`
TemplateKind = Literal["auto", "chat", "alpaca", "none"]
KINDS: tuple[str, ...] = get_args(TemplateKind)
#: which assistant turns of a chat example train (``data.chat_loss``)
ChatLoss = Literal["all", "last"]
CHAT_LOSS: tuple[str, ...] = get_args(ChatLoss)


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
            messages = self.chat_messages(to_messages(example))
            return self._render(messages[: last_assistant(messages)], generation_prompt=True)
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
            messages = self.chat_messages(to_messages(example))
            last = last_assistant(messages)
            prompt = self._render(messages[:last], generation_prompt=True)
            full = self._render(messages[: last + 1])
            if full.startswith(prompt):
                return full[len(prompt):]
            return messages[last]["content"]
        return reference(example)

    # -- chat ------------------------------------------------------------------------------
    def supports_tools(self) -> bool:
        """Whether the tokenizer's chat template renders ``tool_calls`` itself."""
        source = getattr(self.tokenizer, "chat_template", None) or ""
        source = " ".join(source.values()) if isinstance(source, dict) else str(source)
        return "tool_calls" in source

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the chat template takes them: no ``weight``; tool calls and tool results written out as
        text (a tool result becomes a user turn) when the template does not render tools itself."""
        tools = self.supports_tools()
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if k != "weight"}
            if not tools and m.get("tool_calls"):
                calls = "\n".join(_call_text(c) for c in m.pop("tool_calls"))
                m["content"] = (m.get("content") or "") + ("\n" if m.get("content") else "") + calls
            if not tools and m["role"] == "tool":
                name = m.get("name") or m.get("tool_call_id")
                m = {"role": "user", "content": f"[tool result{f' {name}' if name else ''}]\n{m.get('content', '')}"}
            out.append(m)
        return out

    def chat_segments(self, example: dict[str, Any], chat_loss: str = "all") -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, trained)`` pieces that join to the whole.

        Trained pieces are assistant turns (with the template's end-of-turn marker): every one with
        ``chat_loss="all"`` (OpenAI fine-tuning, TRL, LLaMA-Factory), only the last with ``"last"``; an assistant
        message with ``weight: 0`` never is. Turn ``i`` spans from the end of the conversation up to it rendered with
        the assistant header (``add_generation_prompt``) to the end of the conversation up to and including it.
        """
        if chat_loss not in CHAT_LOSS:
            raise ConfigError(f"data.chat_loss must be one of {', '.join(CHAT_LOSS)}, got {chat_loss!r}")
        original = to_messages(example)
        messages = self.chat_messages(original)
        full = self._render(messages)
        turns = [i for i, m in enumerate(original) if m["role"] == "assistant"]
        if chat_loss == "last":
            turns = turns[-1:]
        spans = []
        for i in (i for i in turns if original[i].get("weight", 1) == 1):
            start = len(self._render(messages[:i], generation_prompt=True)) if i else 0
            upto = self._render(messages[: i + 1])
            if not full.startswith(upto) or start > len(upto) or (spans and start < spans[-1][1]):
                # the template rewrites earlier turns (e.g. drops past reasoning): only the last turn is reliable
                warnings.warn("the chat template does not render conversations prefix by prefix; only the last "
                              "assistant turn is trained", stacklevel=2)
                prompt = self.prompt_text(example)
                return [(prompt, False), (self.response_text(example), True)] if original[-1].get("weight", 1) else \
                    [(full, False)]
            spans.append((start, len(upto)))
        pieces, at = [], 0
        for start, end in spans:
            pieces += [(full[at:start], False), (full[start:end], True)]
            at = end
        pieces.append((full[at:], False))
        return [(text, trained) for text, trained in pieces if text]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

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


def reference(example: dict[str, Any]) -> str:
    """The example's answer in its own format: the last assistant turn of ``messages``, ``completion`` or
    ``output`` (what generation is scored against).

    Raises:
        DataError: the example has no answer (or an empty one): scoring against "" would reward saying nothing.
    """
    if "messages" in example:
        messages = example["messages"]
        turns = [m for m in messages if m.get("role") == "assistant"] if isinstance(messages, list) else []
        text = (turns[-1].get("content") or "") if turns else ""
        if turns and not text.strip() and turns[-1].get("tool_calls"):
            text = "\n".join(_call_text(c) for c in turns[-1]["tool_calls"])
    else:
        text = example.get("completion", example.get("output"))
    if not isinstance(text, str) or not text.strip():
        fields = "a last assistant message" if "messages" in example else "'completion' or 'output'"
        raise DataError(f"example has no reference answer ({fields} with text) to score against")
    return text


def last_assistant(messages: list[dict[str, Any]]) -> int:
    """Index of the last assistant message (the answer); the prompt is everything before it."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    raise DataError("the conversation has no assistant message (the answer to train on or score against)")


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    args = fn.get("arguments", "")
    return f"[tool call] {fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})"


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
            header = {"system": "", "assistant": "### Response:\n"}.get(m["role"], "### Instruction:\n")
            parts.append(header + m["content"])
        return "\n\n".join(parts) + "\n\n### Response:\n"
    head = (example["system"] + "\n\n") if example.get("system") else ""
    if example.get("input"):
        return f"{head}### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n### Response:\n"
    return f"{head}### Instruction:\n{example['instruction']}\n\n### Response:\n"
