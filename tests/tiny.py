"""Tiny random models shared by the tests (hidden 32, 2 layers, vocab 100), and helpers on adapters.

Every builder seeds torch itself, so ``tiny.build()`` called twice gives two models with identical weights:
one to adapt and one to compare against, or a "fresh copy of the same base" to load an adapter into.
Dropout is switched off in the base models so that train mode differs from eval mode only through the
adapters.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, even from peft
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from peftkit.core.adapter import AdapterLayer, adapter_parameters  # noqa: E402

VOCAB = 100
HIDDEN = 32
KINDS = ("llama", "gpt2", "bert", "t5", "mlp")
HF_CAUSAL_KINDS = ("llama", "gpt2")  # the ones PEFT interop is checked on


@dataclass
class Tiny:
    """One tiny model family.

    Attributes:
        kind: "llama", "gpt2", "bert", "t5" or "mlp".
        build: a fresh model, identical on every call, in eval mode.
        inputs: keyword arguments of the model's forward.
        output: the model's return value -> one float tensor that every adapted layer influences.
    """

    kind: str
    build: Callable[..., nn.Module]
    inputs: dict[str, torch.Tensor]
    output: Callable[[Any], torch.Tensor]

    def run(self, model: nn.Module) -> torch.Tensor:
        """The model's output tensor on the fixed inputs, without autograd."""
        with torch.no_grad():
            return self.output(model(**self.inputs))

    def run_grad(self, model: nn.Module) -> torch.Tensor:
        return self.output(model(**self.inputs))


def llama_config(**overrides: Any) -> LlamaConfig:
    # grouped-query attention: 4 query heads share 2 key/value heads, so k_proj/v_proj are (16 x 32)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**kw, **overrides})


def gpt2_config(**overrides: Any) -> GPT2Config:
    kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
              eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**kw, **overrides})


def bert_config(**overrides: Any) -> BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    return BertConfig(**{**kw, **overrides})


def t5_config(**overrides: Any) -> T5Config:
    kw = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5Config(**{**kw, **overrides})


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().eval()


def build_llama(**overrides: Any) -> LlamaForCausalLM:
    return _seeded(lambda: LlamaForCausalLM(llama_config(**overrides)))


def build_gpt2(**overrides: Any) -> GPT2LMHeadModel:
    return _seeded(lambda: GPT2LMHeadModel(gpt2_config(**overrides)))


def build_bert(**overrides: Any) -> BertModel:
    return _seeded(lambda: BertModel(bert_config(**overrides)))


def build_t5(**overrides: Any) -> T5ForConditionalGeneration:
    return _seeded(lambda: T5ForConditionalGeneration(t5_config(**overrides)))


def build_mlp() -> nn.Sequential:
    return _seeded(lambda: nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, HIDDEN), act1=nn.Tanh(), fc2=nn.Linear(HIDDEN, HIDDEN), act2=nn.Tanh(),
        out=nn.Linear(HIDDEN, 8),
    )))


def _ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _bert_output(out: Any) -> torch.Tensor:
    # the pooled output too, so the pooler's linear layer influences the result
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=-1)


def make_tiny(kind: str) -> Tiny:
    ids = _ids((2, 8), seed=1)
    logits = lambda out: out.logits  # noqa: E731
    if kind == "llama":
        return Tiny(kind, build_llama, {"input_ids": ids}, logits)
    if kind == "gpt2":
        return Tiny(kind, build_gpt2, {"input_ids": ids}, logits)
    if kind == "bert":
        return Tiny(kind, build_bert, {"input_ids": ids}, _bert_output)
    if kind == "t5":
        return Tiny(kind, build_t5, {"input_ids": ids, "decoder_input_ids": _ids((2, 5), seed=2)}, logits)
    if kind == "mlp":
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        return Tiny(kind, build_mlp, {"input": x}, lambda out: out)
    raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(KINDS)}")


# -- helpers on adapted models ------------------------------------------------------------------


def perturb_adapters(model: nn.Module, adapter: str | None = None, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter parameter random values, so the adapter visibly changes the output.

    Method-agnostic: parameters are found by what they are (peftkit's adapter layers), not by name.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def adapter_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
