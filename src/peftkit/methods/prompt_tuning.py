r"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

N trainable virtual-token embeddings P (N x d) are prepended to the embedded input; the model is frozen::

    h_0 = [P_1, ..., P_N, E[x_1], ..., E[x_T]]        only P trains (N·d parameters)

Init: "random" (Gaussian with the vocabulary embeddings' own scale), "vocab" (rows of E for random token
ids, PEFT's SAMPLE_VOCAB) or "text" (the embeddings of a text such as "Classify the sentiment of this
review:", repeated or cut to N tokens, PEFT's TEXT). Decoder-only models get the prompt before their input,
encoder-decoders (T5) before the encoder's input. Files are PEFT's PROMPT_TUNING files (one tensor
``prompt_embeddings`` of shape (N, d)); how the prompt is injected is in ``_soft_prompt.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.config import ConfigError, check
from peftkit.core.registry import register
from peftkit.methods._soft_prompt import EMBEDDINGS, Geometry, PromptTable, SoftPromptConfig, attach_soft_prompt

Init = Literal["random", "vocab", "text"]


@dataclass
class TokenInit:
    """Where the N starting vectors of an embedding-kind soft prompt come from (shared by P-tuning).

    Attributes:
        init: "random", "vocab" (embeddings of random vocabulary tokens) or "text" (embeddings of ``init_text``).
        init_text: the text whose token embeddings start the prompt (with ``init="text"``).
        tokenizer: tokenizer folder for ``init_text``; default: the model's own folder.
    """

    init: Init = "random"
    init_text: str | None = None
    tokenizer: str | None = None

    def validate_init(self) -> None:
        check(self.init in ("random", "vocab", "text"), f"method.init must be random, vocab or text, got {self.init!r}")
        check(self.init != "text" or bool(self.init_text), "method.init_text must be set when method.init is 'text'")

    @torch.no_grad()
    def init_rows(self, model: nn.Module, embedding: nn.Module, out: torch.Tensor) -> None:
        """Fill ``out`` (N, d) in place with the starting vectors."""
        vocab = embedding.weight.detach()  # (V, d)
        if self.init == "random":
            out.normal_(0.0, float(vocab.float().std()))
        else:
            ids = self._init_ids(model, vocab.shape[0]).to(vocab.device)
            out.copy_(vocab[ids].float())

    def _init_ids(self, model: nn.Module, vocab_size: int) -> torch.Tensor:
        n = self.num_virtual_tokens  # type: ignore[attr-defined]
        if self.init == "vocab":
            return torch.randint(0, vocab_size, (n,))
        ids = _tokenize(self.init_text or "", self.tokenizer or _model_path(model))
        if not ids:
            raise ConfigError(f"method.init_text {self.init_text!r} gives no tokens")
        return torch.tensor((ids * math.ceil(n / len(ids)))[:n])  # repeated or cut to N, as PEFT does


@dataclass
class PromptTuningConfig(TokenInit, SoftPromptConfig):
    """Prompt tuning settings (``init``, ``init_text``, ``tokenizer``: see :class:`TokenInit`)."""

    default_lr = 3e-2

    peft_type = "PROMPT_TUNING"

    def validate(self) -> None:
        super().validate()
        self.validate_init()

    def make_encoder(self, model: nn.Module, embedding: nn.Module) -> nn.Module:
        table = PromptTable(self.num_virtual_tokens, embedding.weight.shape[1], EMBEDDINGS, Geometry.of(model))
        self.init_rows(model, embedding, table.embedding.weight)
        return table

    # -- Hugging Face PEFT adapter_config.json ---------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        text = self.init == "text"
        return {
            "prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[self.init],
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": self.tokenizer if text else None,
            "tokenizer_kwargs": None,
        }

    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        d = super().to_peft(model, targets)
        if self.init == "text" and not d["tokenizer_name_or_path"]:
            d["tokenizer_name_or_path"] = _model_path(model)  # PEFT requires it with TEXT
        return d

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> PromptTuningConfig:
        if d.get("num_virtual_tokens") is None:
            raise ConfigError("adapter_config.json has no 'num_virtual_tokens'")
        # the weights come from the file: the text init is recorded, not run again (its tokenizer may be elsewhere)
        return cls(**cls.common_from_peft(d), init="random", init_text=d.get("prompt_tuning_init_text"),
                   tokenizer=d.get("tokenizer_name_or_path"))


def _model_path(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    path = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    if not path:
        raise ConfigError("method.init='text' needs a tokenizer: set method.tokenizer to a tokenizer folder")
    return str(path)


def _tokenize(text: str, tokenizer: str) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.tokenizer: cannot load a tokenizer from {tokenizer!r} ({e})") from None
    return tok(text, add_special_tokens=False)["input_ids"]


@register("prompt_tuning", PromptTuningConfig,
          "prompt tuning: N trainable virtual-token embeddings prepended to the input of a frozen model")
def attach_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> list[str]:
    return attach_soft_prompt(model, config, adapter_name)
