r"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is split into a direction, updated by LoRA, and a learned magnitude per output feature::

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖        ‖·‖: L2 norm of each output feature's weights, m ∈ R^out

    h = W'·x + b = W0·x + b + (f - 1) ⊙ W0·x + f ⊙ s·B·A·x,      f = m / ‖W0 + s·B·A‖

m starts at ‖W0 + s·B·A‖ (so f = 1 and DoRA starts as its LoRA, the base model with the usual B = 0). As in
the paper (sec. 4.3) and PEFT, the norm is treated as a constant: no gradient flows through it.

The LoRA part is LoRA's own layers (:mod:`peftkit.methods.lora`); a DoRA layer adds the magnitudes and may
also hold plain LoRA adapters. Files are PEFT LoRA files with ``use_dora: true`` and one more key per
module, ``<module>.lora_magnitude_vector`` (shape (out,); (embedding dim,) for embeddings).

Merging folds it all into W0 exactly: W' = W0 + (f - 1) ⊙ W0 + f ⊙ s·B·A. While merged the layer keeps the
unmerged weight, so ``unmerge`` restores it bit for bit (one copy of the weight per merged layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.adapter import AdapterLayer
from peftkit.core.config import ConfigError
from peftkit.core.inject import attach_layers
from peftkit.core.registry import register
from peftkit.methods.lora import (
    LoraConfig,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    add_lora_adapter,
    default_targets,
    new_lora_layer,
)


@dataclass
class DoraConfig(LoraConfig):
    """DoRA settings: every LoRA field (r, alpha, dropout, targets, ...) means what it means for LoRA."""

    combinable = False  # the magnitudes rescale W0 + s·B·A: no low-rank delta to combine

    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {**super().to_peft(model, targets), "use_dora": True}

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return bool(d.get("use_dora"))


class DoraMixin:
    """Magnitudes on top of a LoRA layer; adapters without one in ``lora_magnitude_vector`` stay plain LoRA."""

    lora_magnitude_vector: nn.ParameterDict
    fan_in_fan_out: bool
    _unmerged_weight: torch.Tensor | None

    #: the plain sum: a DoRA change is no single GEMM (plain LoRA adapters on a DoRA layer are summed so too)
    add_delta = AdapterLayer.add_delta

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self._unmerged_weight = None  # the base weight, kept while adapters are merged

    @property
    def _out_last(self) -> bool:
        """Is the output feature the stored weight's second axis? (Conv1D (in, out), Embedding (num, dim))."""
        return self.fan_in_fan_out or isinstance(self.base_layer, nn.Embedding)

    def add_magnitude(self, name: str) -> None:
        """Make adapter ``name`` (already added as LoRA) a DoRA adapter: m = ‖W0 + s·B·A‖."""
        with torch.no_grad():
            norm = self.weight_norm(name, self.base_layer.weight)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(self._adapter_dtype()))

    def weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per output feature, (out,), without gradient."""
        with torch.no_grad():
            full = weight.float() + self.delta_weight(name).float()  # stored layout
            return torch.linalg.vector_norm(full, dim=0 if self._out_last else 1)

    def _factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """f = m / ‖W + s·B·A‖, (out,): differentiable in m only."""
        m = self.lora_magnitude_vector[name]
        return m / self.weight_norm(name, weight).to(m.dtype)

    def _along_out(self, f: torch.Tensor) -> torch.Tensor:
        return f.view(1, -1) if self._out_last else f.view(-1, 1)

    # -- merging: additive deltas computed from the unmerged weight --------------------------------
    def merged_delta(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return delta  # plain LoRA adapter
        f = self._along_out(self._factor(name, weight).detach())
        return (f - 1) * weight + f * delta  # (stored layout)

    def merge(self, adapters: list[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in adapters or self.active_adapters:
            if name in self.merged_adapters:
                continue
            if self._unmerged_weight is None:
                self._unmerged_weight = weight.detach().clone()
            with torch.no_grad():
                weight.add_(self.merged_delta(name, self._unmerged_weight.float()).to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()


class DoraLinear(DoraMixin, LoraLinear):
    """``nn.Linear`` or GPT-2 ``Conv1D`` + DoRA (and possibly plain LoRA adapters)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``base`` (..., out) of input ``x`` (..., in)."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        weight = self.base_layer.weight
        h = dropout(x.to(A.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x)
        lora = B(A(h)) * s  # (..., out)
        if name not in self.lora_magnitude_vector:
            return lora
        f = self._factor(name, weight)  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            plain = base if self.bias is None else base - self.bias  # W0·x, (..., out)
        else:  # PEFT's rule: with active dropout the magnitude term sees the dropped-out input too
            plain = F.linear(h.to(weight.dtype), weight.T if self.fan_in_fan_out else weight)
        return (f - 1) * plain + f * lora


class DoraEmbedding(DoraMixin, LoraEmbedding):
    """``nn.Embedding`` + DoRA: the magnitude is per embedding dimension, as in PEFT."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base embeddings ``base`` (..., dim) of token ids ``x``."""
        lora = super().delta(name, x, base)  # (..., dim)
        if name in self.lora_magnitude_vector:
            f = self._factor(name, self.base_layer.weight)  # (dim,)
            lora = (f - 1) * base + f * lora
        return lora


def _to_dora(layer: LoraLayer, name: str) -> DoraLinear | DoraEmbedding:
    """A DoRA layer holding ``layer``'s plain LoRA adapters (the module already wrapped by LoRA)."""
    if layer.merged:
        raise ConfigError(f"module {name!r} has merged LoRA adapters; unmerge them before adding a DoRA adapter")
    new = DoraEmbedding(layer.base_layer) if isinstance(layer, LoraEmbedding) else DoraLinear(layer.base_layer)
    for attr in (*layer.adapter_attrs, "lora_dropout"):
        setattr(new, attr, getattr(layer, attr))
    new.scaling = dict(layer.scaling)
    new.active_adapters, new.disabled = list(layer.active_adapters), layer.disabled
    return new


@register("dora", DoraConfig, "DoRA: LoRA on the weight's direction plus a learned magnitude per output feature (mergeable)")
def attach_dora(model: nn.Module, config: DoraConfig, adapter_name: str) -> list[str]:
    def add(layer: DoraLinear | DoraEmbedding, name: str) -> None:
        add_lora_adapter(layer, name, config, adapter_name)
        layer.add_magnitude(adapter_name)

    return attach_layers(model, config, method="DoRA", own=(DoraLinear, DoraEmbedding), default_targets=default_targets,
                         make=lambda module: new_lora_layer(module, DoraLinear, DoraEmbedding), add=add,
                         # plain LoRA adapters already there carry on as they were
                         adopt=lambda layer, name: _to_dora(layer, name) if isinstance(layer, LoraLayer) else None)
