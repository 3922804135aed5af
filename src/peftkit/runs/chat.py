"""``peftkit chat``: talk to a fine-tune in the terminal, with the template it trained with, answers streamed
token by token.

A chat template keeps the conversation (oldest turns dropped when prompt + answer would pass the model's context);
an alpaca or plain template has no turns, so each message is answered on its own. Commands: ``/reset`` forgets the
conversation, ``/system TEXT`` sets the system message (and resets), ``/exit`` ends. Read from a pipe, every line is
one message and every answer one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from peftkit.data.template import Template, user_example
from peftkit.errors import ConfigError
from peftkit.train.precision import model_device

HELP = "/reset: forget the conversation · /system TEXT: set the system message · /exit: quit"


class _Streamer:
    """transformers' streamer protocol (``put`` / ``end``): decodes the new tokens as they come and hands on the
    text that is complete (a multi-byte character split across tokens waits for its last byte)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._send(text)

    def end(self) -> None:
        self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


@dataclass
class ChatSession:
    """One conversation with ``model``.

    Attributes:
        context: tokens the model reads at most (prompt + answer); older turns are dropped to fit.
    """

    model: nn.Module
    template: Template
    system: str | None = None
    max_new_tokens: int = 256
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    context: int = 2048
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for a new user message: as many past turns as fit beside ``max_new_tokens``.

        Raises:
            ConfigError: the message alone does not fit.
        """
        if self.template.kind != "chat":
            ex = user_example(text, self.system)
            return self.template.prompt_ids(ex)
        turns = list(self.history)
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            messages = [*system, *turns, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            ids = self.template.prompt_ids({"messages": messages})
            if len(ids) + self.max_new_tokens <= self.context:
                del self.history[: len(self.history) - len(turns)]
                return ids
            if not turns:
                raise ConfigError(f"the message is {len(ids)} tokens; with {self.max_new_tokens} for the answer it "
                                  f"does not fit the model's {self.context}")
            turns = turns[2:]  # the oldest user/assistant pair

    @torch.no_grad()
    def reply(self, text: str, emit: Callable[[str], None]) -> str:
        """Answer ``text``, handing each new piece of the answer to ``emit``; the turn joins the history."""
        ids = self.prompt_ids(text)
        tok = self.template.tokenizer
        streamer = _Streamer(tok, emit)
        self.model.eval()
        extra = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.sample else \
            {"do_sample": False}
        device = model_device(self.model)
        out = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                  max_new_tokens=self.max_new_tokens, eos_token_id=self.template.stop_token_ids(),
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                  streamer=streamer, **extra)
        answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        if self.template.kind == "chat":
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def run_chat(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
             interactive: bool = False) -> None:
    """Answer each line (commands: module docstring); errors about one message are reported and the chat goes on."""
    if interactive:
        write(f"{HELP}\n")
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            write("(conversation reset)\n")
        elif command == "/system":
            session.system = rest.strip() or None
            session.reset()
            write(f"(system message {'set' if session.system else 'cleared'}; conversation reset)\n")
        elif command in ("/help", "/?"):
            write(f"{HELP}\n")
        else:
            try:
                session.reply(text, write)
            except ConfigError as e:
                write(f"peftkit: error: {e}")
            write("\n")
