r"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight W0 (out x in) gets a trainable low-rank update::

        x ──────────────► W0 ──────────────┐
        │                                  (+) ──► h = W0·x + s·B·A·x
        └──► dropout ──► A (r x in) ──► B (out x r) ──► · s ┘

    s = alpha / r   (rsLoRA: s = alpha / sqrt(r), Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)

A starts Kaiming-uniform (or Gaussian), B starts at zero, so the model is unchanged at init.
After training the update folds into W0 (``merge``) for zero inference overhead.

Wraps ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored as (in, out): the delta is transposed) and
``nn.Embedding`` (A: r x num_embeddings looked up by token id, B: dim x r). Parameter names and file
keys match Hugging Face PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.adapter import AdapterLayer
from peftkit.core.config import ConfigError, TargetedConfig, check
from peftkit.core.inject import attach_layers
from peftkit.core.registry import register
from peftkit.core.targeting import compact_targets, is_linear_like

# Usual LoRA targets per model family when target_modules is not given (as PEFT's defaults).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}

Init = Literal["kaiming", "gaussian", "random"]


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA settings.

    Attributes:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout on the LoRA branch's input (0 disables it and costs nothing).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        init: "kaiming" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero), or "random"
            (B random too: the model changes at init; for tests).
        bias: which biases train: "none", "all", or "lora_only" (biases of adapted layers).
        rank_pattern: per-module rank overrides, ``{name or regex: r}`` (PEFT's rank_pattern).
        alpha_pattern: per-module alpha overrides, ``{name or regex: alpha}``.
    """

    peft_type = "LORA"
    combinable = True  # a plain low-rank delta s·B·A: methods/lora_combine.py

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: Init = "kaiming"
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"method.r must be a positive integer, got {self.r!r}")
        check(0.0 <= self.dropout < 1.0, f"method.dropout must be in [0, 1), got {self.dropout!r}")
        check(self.init in ("kaiming", "gaussian", "random"), f"method.init must be kaiming, gaussian or random, got {self.init!r}")
        check(self.bias in ("none", "all", "lora_only"), f"method.bias must be none, all or lora_only, got {self.bias!r}")
        for k, v in self.rank_pattern.items():
            check(isinstance(v, int) and v > 0, f"method.rank_pattern[{k!r}] must be a positive integer, got {v!r}")

    # -- per-module values -------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.alpha)

    def scaling(self, name: str) -> float:
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)

    # -- Hugging Face PEFT adapter_config.json ---------------------------------------------
    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        conv1d = any(type(model.get_submodule(t).base_layer).__name__ == "Conv1D" for t in targets)
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            # the exact modules adapted (exclude/layers already applied), as short as possible
            "target_modules": compact_targets(model, targets),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "fan_in_fan_out": conv1d,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}[self.init],
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "use_dora": False,
            "lora_bias": False,
        }

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return not d.get("use_dora")

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> LoraConfig:
        for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
            if d.get(key):
                raise ConfigError(f"adapter_config.json uses {key!r}, which peftkit does not support")
        if d.get("lora_bias"):
            raise ConfigError("adapter_config.json uses 'lora_bias', which peftkit does not support")
        if d.get("ensure_weight_tying") and d.get("modules_to_save"):
            raise ConfigError("adapter_config.json uses 'ensure_weight_tying' with 'modules_to_save' (one trained copy "
                              "shared by tied modules), which peftkit does not support; without it a tied module in "
                              "modules_to_save gets a copy of its own, as in PEFT")
        if d.get("layers_pattern") and d.get("layers_to_transform") is not None:
            raise ConfigError("adapter_config.json uses 'layers_pattern', which peftkit does not support")
        init = d.get("init_lora_weights", True)
        layers = d.get("layers_to_transform")
        return cls(
            r=int(d.get("r", 8)),
            alpha=float(d.get("lora_alpha", 8)),
            dropout=float(d.get("lora_dropout", 0.0)),
            target_modules=d.get("target_modules"),
            exclude=d.get("exclude_modules"),
            layers=[layers] if isinstance(layers, int) else layers,
            modules_to_save=d.get("modules_to_save"),
            use_rslora=bool(d.get("use_rslora", False)),
            init={True: "kaiming", "gaussian": "gaussian", False: "random"}.get(init, "kaiming"),
            bias=d.get("bias", "none"),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern={k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
        )


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's rule: a key matches a module whose name is the key, or ends with "." + key (keys may be regexes)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoraLayer(AdapterLayer):
    """LoRA around a linear-like or embedding layer; one entry per adapter name in each dict."""

    mergeable = True
    mixable = True
    fan_in_fan_out = False  # GPT-2's Conv1D stores its weight (in, out): set by LoraLinear

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.scaling.pop(adapter, None)
        if adapter in self.lora_dropout:
            del self.lora_dropout[adapter]

    def _adapter_dtype(self) -> torch.dtype:
        # adapter master weights stay in fp32 even over a bf16/fp16 base
        dtype = self.base_layer.weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class LoraLinear(LoraLayer):
    """``nn.Linear`` or GPT-2 ``Conv1D`` + LoRA."""

    adapter_attrs = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        kw = {"device": self.base_layer.weight.device, "dtype": self._adapter_dtype()}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        _init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init, r)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _down(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A·dropout(x), (..., r); outside autocast the input is cast to the adapter's dtype first."""
        A = self.lora_A[name]
        return A(self.lora_dropout[name](x if torch.is_autocast_enabled(x.device.type) else x.to(A.weight.dtype)))

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self._down(name, x)) * self.scaling[name]  # (..., out)

    def add_delta(self, name: str, x: torch.Tensor, base: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        B, s = self.lora_B[name], self.scaling[name]
        a = self._down(name, x)  # (..., r)
        if torch.is_autocast_enabled(x.device.type) or a.dtype != result.dtype:
            return result + (B(a) * s).to(result.dtype)  # (..., out)
        # result + s·a·Bᵀ as one GEMM accumulating into a copy of result: no (..., out) temporaries for
        # B(a), its scaled copy and the sum (bench/levers.py: 2-6% of a q/v layer's forward + backward)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), B.weight.T, alpha=s)
        return out.view(result.shape)  # (..., out)


class LoraEmbedding(LoraLayer):
    """``nn.Embedding`` + LoRA: the token's column of A (r x vocab), mapped up by B (dim x r)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        num, dim = self.base_layer.weight.shape
        kw = {"device": self.base_layer.weight.device, "dtype": self._adapter_dtype()}
        A = nn.Parameter(torch.zeros(r, num, **kw))
        B = nn.Parameter(torch.empty(dim, r, **kw))
        nn.init.normal_(B)  # PEFT's embedding init: A zero, B normal
        if init == "random":
            nn.init.normal_(A)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = A, B
        self.lora_dropout[name] = nn.Identity()
        self.scaling[name] = scaling

    def delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        return (B @ A).T * self.scaling[adapter]  # (num, dim)

    def _down(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The token ids' columns of A, (..., r), looked up with the base embedding's options."""
        emb = self.base_layer
        return F.embedding(x, self.lora_embedding_A[name].T, emb.padding_idx, emb.max_norm, emb.norm_type,
                           emb.scale_grad_by_freq, emb.sparse)

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return (self._down(name, x) @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)


def _init_pair(A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
    """A as ``nn.Linear`` initialises its weight (Kaiming-uniform, a = sqrt(5): what Hu et al.'s reference code and
    PEFT use) or N(0, 1/r) (PEFT's "gaussian"); B zero, so the adapted model starts as the base (Hu et al. 2021, 4.1)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


def default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type, "all-linear")


@register("lora", LoraConfig, "LoRA: trainable low-rank update B·A beside frozen linear/embedding weights (mergeable)")
def attach_lora(model: nn.Module, config: LoraConfig, adapter_name: str,
                linear_cls: type[LoraLinear] | None = None) -> list[str]:
    """Args: linear_cls: the wrapper for linear layers (QLoRA passes its subclass for quantized layers)."""
    return attach_layers(model, config, method="LoRA", own=LoraLayer, default_targets=default_targets,
                         make=lambda module: new_lora_layer(module, linear_cls or LoraLinear),
                         add=lambda layer, name: add_lora_adapter(layer, name, config, adapter_name))


def new_lora_layer(module: nn.Module, linear_cls: type[LoraLinear] = LoraLinear,
                   embedding_cls: type[LoraEmbedding] = LoraEmbedding) -> LoraLayer | None:
    """The LoRA layer around an embedding or a linear-like layer; None for other modules."""
    if isinstance(module, nn.Embedding):
        return embedding_cls(module)
    return linear_cls(module) if is_linear_like(module) else None


def add_lora_adapter(layer: LoraLayer, name: str, config: LoraConfig, adapter_name: str) -> None:
    """Add adapter ``adapter_name`` to the layer of module ``name``, with that module's rank and scaling."""
    layer.add_adapter(adapter_name, config.rank_for(name), config.scaling(name), config.dropout, config.init)
