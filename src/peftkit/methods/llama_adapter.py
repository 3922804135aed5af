r"""LLaMA-Adapter: zero-initialised attention over learned adaption prompts (Zhang et al. 2023,
https://arxiv.org/abs/2303.16199), in Hugging Face PEFT's form (``ADAPTION_PROMPT``).

In each of the top L attention layers, a learned prompt P (len x d) is projected by the layer's own key
and value projections, and every query also attends to it, in a softmax of its own, scaled by a gate g
that starts at zero::

    out = Attn(x) + W_o · ( g · softmax(q·K_P^T / sqrt(d_head)) · V_P )      K_P = W_k·P, V_P = W_v·P

so training starts from the unchanged model (g = 0) and the prompt's influence grows as g is learned.
q carries the layer's rotary position embedding; the prompt's keys carry none (they have no position), as
in PEFT. With grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) each key/value head of
the prompt serves its group of query heads, as the model's own keys do. The prompt never enters the KV
cache, so generation with a cache gives the same tokens as without.

Supported: Llama-family attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, module ``self_attn``) and
GPT-2 (``attn`` with a fused ``c_attn``; as in PEFT, the prompt's output is added without ``c_proj``).
g = 0 at init (PEFT's init); P ~ N(0, 0.3²) by default, where PEFT (and the official code) draw N(0, 1):
the attention's inputs are RMS-normed hidden states, ~0.35 RMS in SmolLM2-135M, so an N(0, 1) prompt has
keys 2.3x the tokens' and a near one-hot prompt softmax; on SmolLM2 + rotten-tomatoes (30 steps) that scored
0.43-0.80 test accuracy over 3 seeds where 0.3 scored 0.77-0.82 over 5 (docs/methods.md). ``init_std: 1.0``
gives PEFT's init; the file is the same either way. File keys are PEFT's: ``<attention>.adaption_prompt``
(1, len, d) and ``<attention>.adaption_gate`` (1,). Not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.adapter import AdapterLayer
from peftkit.core.config import ConfigError, MethodConfig, check
from peftkit.core.inject import wrap_modules
from peftkit.core.registry import register

# The attention module's name per model family (PEFT's TRANSFORMERS_MODEL_CONFIG and its Llama look-alikes).
DEFAULT_TARGET: dict[str, str] = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn", "gpt2": "attn"}


@dataclass
class LlamaAdapterConfig(MethodConfig):
    """LLaMA-Adapter settings.

    Attributes:
        adapter_len: number of prompt vectors per adapted layer (the paper uses 10).
        adapter_layers: adapt the top this many attention layers; None: all of them (the paper: 30 of 32).
            On SmolLM2-135M (30 layers) the top 10 learned only the label prior of rotten-tomatoes (0.56 test
            accuracy, below zero-shot 0.71); all 30 reached 0.77-0.82.
        target_modules: the attention modules' name (``"self_attn"``, ``"attn"``); None: the family's.
        init_std: standard deviation of the prompt's normal init (PEFT's: 1.0; see the module doc). Not in
            the file: it only decides where training starts.
    """

    default_lr = 1e-2

    peft_type = "ADAPTION_PROMPT"

    adapter_len: int = 10
    adapter_layers: int | None = None
    target_modules: str | None = None
    init_std: float = 0.3

    def validate(self) -> None:
        check(isinstance(self.adapter_len, int) and self.adapter_len > 0,
              f"method.adapter_len must be a positive integer, got {self.adapter_len!r}")
        check(self.adapter_layers is None or (isinstance(self.adapter_layers, int) and self.adapter_layers > 0),
              f"method.adapter_layers must be a positive integer or null, got {self.adapter_layers!r}")
        check(isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool)
              and 0 < self.init_std < math.inf,
              f"method.init_std must be a finite number > 0, got {self.init_std!r}")

    def target_for(self, model: nn.Module) -> str:
        if self.target_modules:
            return self.target_modules
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET:
            raise ConfigError(f"LLaMA-Adapter does not know the attention modules of model type {model_type!r}; "
                              "set method.target_modules (it supports Llama-style and GPT-2 attention)")
        return DEFAULT_TARGET[model_type]

    # -- Hugging Face PEFT adapter_config.json ---------------------------------------------
    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {
            "peft_type": "ADAPTION_PROMPT",
            "target_modules": self.target_for(model),
            "adapter_len": self.adapter_len,
            "adapter_layers": len(targets),
        }

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return True

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> LlamaAdapterConfig:
        return cls(adapter_len=int(d["adapter_len"]), adapter_layers=int(d["adapter_layers"]),
                   target_modules=d.get("target_modules"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAdapterAttention(AdapterLayer):
    """An attention module plus gated adaption prompts, one (prompt, gate) pair per adapter name."""

    adapter_attrs = ("adaption_prompt", "adaption_gate")
    mergeable = False

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        if all(hasattr(base_layer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            self.style = "llama"
            self.head_dim = int(getattr(base_layer, "head_dim"))
            self.hidden_size = base_layer.q_proj.weight.shape[1]
            self.num_heads = base_layer.q_proj.weight.shape[0] // self.head_dim
            self.num_kv_heads = base_layer.k_proj.weight.shape[0] // self.head_dim
        elif hasattr(base_layer, "c_attn") and hasattr(base_layer, "split_size"):
            self.style = "gpt2"
            self.head_dim = int(base_layer.head_dim)
            self.hidden_size = base_layer.split_size
            self.num_heads = self.num_kv_heads = base_layer.num_heads
        else:
            raise ConfigError(f"LLaMA-Adapter cannot adapt module {name!r} ({type(base_layer).__name__}): it needs "
                              "Llama-style q_proj/k_proj/v_proj/o_proj or GPT-2's c_attn")
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def add_adapter(self, name: str, adapter_len: int, init_std: float) -> None:
        weight = next(self.base_layer.parameters())
        kw = {"device": weight.device,
              "dtype": weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32}
        self.adaption_prompt[name] = nn.Parameter(torch.randn(1, adapter_len, self.hidden_size, **kw) * init_std)
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, **kw))  # zero-init: the base model at start

    # -- queries of the current tokens, and keys/values of a prompt: (B, heads, T, head_dim) ----------
    def _queries(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        B, T, _ = hidden.shape
        base = self.base_layer
        if self.style == "gpt2":
            q = base.c_attn(hidden).split(self.hidden_size, dim=2)[0]
            return q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q = base.q_proj(hidden).view(B, T, self.num_heads, self.head_dim)
        if hasattr(base, "q_norm"):  # Qwen3-style per-head norm
            q = base.q_norm(q)
        q = q.transpose(1, 2)
        if kwargs.get("position_embeddings") is None:
            raise ValueError("LLaMA-Adapter needs the rotary position_embeddings the model passes its attention "
                             "modules (transformers >= 4.48)")
        cos, sin = kwargs["position_embeddings"]  # (B, T, head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin

    def _prompt_kv(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.adaption_prompt[name].to(dtype)  # (1, L, d)
        L = prompt.shape[1]
        base = self.base_layer
        if self.style == "gpt2":
            _, k, v = base.c_attn(prompt).split(self.hidden_size, dim=2)  # (1, L, d) each
        else:
            k, v = base.k_proj(prompt), base.v_proj(prompt)  # (1, L, kv_heads * head_dim)
        k = k.view(1, L, self.num_kv_heads, self.head_dim)
        if hasattr(base, "k_norm"):
            k = base.k_norm(k)
        k = k.transpose(1, 2)  # (1, kv_heads, L, head_dim)
        v = v.view(1, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads  # GQA: each key/value head serves a group of query heads
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (1, heads, L, head_dim)

    def prompt_output(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """g · softmax(q·K_P^T / sqrt(d_head)) · V_P, through W_o (Llama): (B, T, d)."""
        B, _, T, _ = q.shape
        k, v = self._prompt_kv(name, q.dtype)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, heads, T, L)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = self.adaption_gate[name].to(q.dtype) * probs
        out = (probs @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, heads * head_dim)
        if self.style == "llama":
            o_proj = self.base_layer.o_proj
            out = o_proj(out)
            if getattr(o_proj, "bias", None) is not None:  # the attention output already has W_o's bias
                out = out - o_proj.bias
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = self.use_adapters()
        out = self.base_layer(*args, **kwargs)
        if not adapters:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)
        attn_out, rest = out[0], out[1:]
        q = self._queries(hidden, kwargs)
        for name in adapters:
            attn_out = attn_out + self.prompt_output(name, q).to(attn_out.dtype)
        return (attn_out, *rest)


@register("llama_adapter", LlamaAdapterConfig,
          "LLaMA-Adapter: gated learned prompts attended by every (or the top N) attention layer, zero-init gate "
          "(not mergeable)")
def attach_llama_adapter(model: nn.Module, config: LlamaAdapterConfig, adapter_name: str) -> list[str]:
    target = config.target_for(model)
    # PEFT's rule: modules named "...<target>", in model order; the last adapter_layers of them
    modules = [n for n, m in model.named_modules() if n.endswith("." + target) and ".base_layer" not in n]
    if not modules:
        raise ConfigError(f"method.target_modules={target!r} matched no module")
    count = config.adapter_layers or len(modules)
    if count > len(modules):
        raise ConfigError(f"method.adapter_layers={count} but the model has only {len(modules)} {target!r} modules")
    targets = modules[-count:]

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, LlamaAdapterAttention):
            layer = module
        elif isinstance(module, AdapterLayer):
            raise ConfigError(f"module {name!r} is already adapted by another method ({type(module).__name__})")
        else:
            layer = LlamaAdapterAttention(module, name)
        layer.add_adapter(adapter_name, config.adapter_len, config.init_std)
        return layer

    wrap_modules(model, targets, wrap)
    return targets
