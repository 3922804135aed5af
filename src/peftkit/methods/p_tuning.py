r"""P-tuning (Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Virtual tokens are produced by a trainable prompt encoder from N trainable input vectors z (N x d)::

    MLP:   P = W3·relu(W2·relu(W1·z))                         (d -> h -> h -> d)
    LSTM:  P = MLP(BiLSTM(z)),  MLP: 2h -> 2h -> relu -> d     (tokens see each other through the LSTM)
    residual (peftkit's default):  P = z + encoder(z), with the encoder's last layer zero-initialised

With ``residual`` the prompt starts exactly at z, which is initialised like prompt tuning's (random, sampled
vocabulary embeddings, or a text), and the encoder learns a correction. PEFT's encoder (``residual: false``,
``init: random``) starts from the output of a random MLP on random inputs: on SmolLM2-135M + rotten-tomatoes
it stayed at or below zero-shot accuracy at every learning rate tried (see docs/methods.md).

    h_0 = [P_1, ..., P_N, E[x_1], ..., E[x_T]]        as in prompt tuning, the model is frozen

The reparameterization only eases training: after it, P is stored as a plain lookup table (as PEFT does:
``prompt_embeddings`` = the encoder's output), and a loaded adapter is that table. With ``save_encoder``
the encoder's weights are written too (keys ``prompt_encoder.*``), so training can resume from the file.
Module layout follows PEFT's ``PromptEncoder``; with ``residual: false`` and ``init: random`` so does the init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.config import ConfigError, check
from peftkit.core.registry import register
from peftkit.methods._soft_prompt import EMBEDDINGS, Geometry, PromptSource, SoftPromptConfig, attach_soft_prompt
from peftkit.methods.prompt_tuning import TokenInit


@dataclass
class PTuningConfig(TokenInit, SoftPromptConfig):
    """P-tuning settings (``init``, ``init_text``, ``tokenizer`` set the inputs z: see :class:`TokenInit`).

    Attributes:
        residual: P = z + encoder(z) with a zero-initialised last layer (starts at z); false: PEFT's P = encoder(z).
        encoder: "mlp" (two hidden layers) or "lstm" (bidirectional LSTM, then an MLP).
        encoder_hidden_size: h; default: the model's hidden size.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers, as in PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    default_lr = 1e-2

    peft_type = "P_TUNING"

    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    init: Literal["random", "vocab", "text"] = "vocab"
    residual: bool = True

    def validate(self) -> None:
        super().validate()
        self.validate_init()
        check(isinstance(self.residual, bool), f"method.residual must be true or false, got {self.residual!r}")
        check(self.encoder in ("mlp", "lstm"), f"method.encoder must be mlp or lstm, got {self.encoder!r}")
        check(self.encoder_hidden_size is None or self.encoder_hidden_size > 0,
              f"method.encoder_hidden_size must be positive, got {self.encoder_hidden_size!r}")
        check(self.encoder_num_layers > 0, f"method.encoder_num_layers must be positive, got {self.encoder_num_layers!r}")
        check(0.0 <= self.encoder_dropout < 1.0, f"method.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    def make_encoder(self, model: nn.Module, embedding: nn.Module) -> nn.Module:
        dim = embedding.weight.shape[1]
        encoder = PromptEncoder(self.num_virtual_tokens, dim, self.encoder_hidden_size or dim, self.encoder,
                                self.encoder_num_layers, self.encoder_dropout, Geometry.of(model), self.residual)
        if self.residual or self.init != "random":
            self.init_rows(model, embedding, encoder.embedding.weight)
        return encoder

    # -- Hugging Face PEFT adapter_config.json ---------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        d = super().to_peft(model, targets)
        d["encoder_hidden_size"] = self.encoder_hidden_size or d["token_dim"]
        if self.save_encoder:  # the saved encoder's forward depends on it (PEFT reads the table and ignores this key)
            d["peftkit_residual"] = self.residual
        return d

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> PTuningConfig:
        kind = str(d.get("encoder_reparameterization_type") or "MLP").lower()
        if kind not in ("mlp", "lstm"):
            raise ConfigError(f"adapter_config.json: unknown encoder_reparameterization_type {kind.upper()!r}")
        # the weights come from the file; an encoder saved by PEFT is the plain, non-residual one
        return cls(**cls.common_from_peft(d), encoder=kind, encoder_hidden_size=d.get("encoder_hidden_size"),
                   init="random", residual=bool(d.get("peftkit_residual", False)),
                   encoder_num_layers=int(d.get("encoder_num_layers") or 2),
                   encoder_dropout=float(d.get("encoder_dropout") or 0.0))


class PromptEncoder(PromptSource):
    """N input vectors (``embedding``) mapped to N virtual tokens by an MLP, or a BiLSTM + MLP (PEFT's names)."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float,
                 geometry: Geometry, residual: bool = False) -> None:
        super().__init__(n, dim, EMBEDDINGS, geometry)
        self.encoder_type, self.residual = kind, residual
        self.embedding = nn.Embedding(n, dim)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        if residual:  # start exactly at z
            nn.init.zeros_(self.mlp_head[-1].weight)
            nn.init.zeros_(self.mlp_head[-1].bias)

    def forward(self) -> torch.Tensor:
        z = self.embedding.weight.unsqueeze(0)  # (1, N, d)
        h = self.lstm_head(z)[0] if self.encoder_type == "lstm" else z  # (1, N, 2h) or (1, N, d)
        out = self.mlp_head(h)[0]  # (N, d)
        return z[0] + out if self.residual else out


@register("p_tuning", PTuningConfig,
          "P-tuning: virtual tokens produced by a trainable MLP/LSTM prompt encoder, saved as a plain table")
def attach_p_tuning(model: nn.Module, config: PTuningConfig, adapter_name: str) -> list[str]:
    return attach_soft_prompt(model, config, adapter_name)
