r"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

A frozen layer h = W·x + b is rescaled by a learned vector l, on its output or, for feed-forward layers, on
its input::

    attention-style target:   h = l ⊙ (W·x + b)          l ∈ R^out   (keys, values)
    feed-forward target:      h = W·(l ⊙ x) + b          l ∈ R^in    (the FFN's second layer)

l starts at ones, so the model is unchanged at init. Merging folds l into W (rows, or columns for
feed-forward targets; the bias too for output scaling): W' = diag(l)·W or W' = W·diag(l). Unmerging divides
it back out (exact up to rounding while no entry of l is zero).

Files are Hugging Face PEFT's IA3 files: key ``<module>.ia3_l`` of shape (out, 1), or (1, in) for
feed-forward modules, and PEFT's ``feedforward_modules`` rule (a list entry matches every module whose
name ends with it, with no dot required; a string is a regex over the whole name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.adapter import AdapterLayer, Rows
from peftkit.core.config import TargetedConfig, check
from peftkit.core.inject import attach_layers
from peftkit.core.registry import register
from peftkit.core.targeting import TargetSpec, compact_targets, is_linear_like

# PEFT's defaults per model family (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"], "bart": ["q_proj", "v_proj", "fc2"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"], "t5": ["wo"], "bart": ["fc2"],
}


@dataclass
class IA3Config(TargetedConfig):
    """(IA)³ settings.

    Attributes:
        feedforward_modules: targets whose *input* is scaled (PEFT's rule: list entries match names ending with
            them, a string is a regex). None: the family's FFN output layer (``down_proj``, ``mlp.c_proj``, ...),
            or none for unknown models. Must be a subset of ``target_modules`` when both are lists.
        init: "ones" (the base model at init) or "random" (l ~ N(0, 1), as PEFT's ``init_ia3_weights=False``; tests).
    """

    default_lr = 1e-2

    peft_type = "IA3"

    feedforward_modules: list[str] | str | None = None
    init: Literal["ones", "random"] = "ones"

    def validate(self) -> None:
        check(self.init in ("ones", "random"), f"method.init must be ones or random, got {self.init!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            for name in self.feedforward_modules:  # PEFT's rule too
                check(name in self.target_modules, f"method.feedforward_modules must be a subset of "
                                                   f"method.target_modules; {name!r} is not in it")

    def is_feedforward(self, name: str, model_type: str | None) -> bool:
        spec = self.feedforward_modules
        if spec is None:
            spec = DEFAULT_FEEDFORWARD.get(model_type or "", [])
        return peft_is_feedforward(spec, name)

    # -- Hugging Face PEFT adapter_config.json ---------------------------------------------
    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        ff = [t for t in targets if self.is_feedforward(t, model_type)]
        target_spec, ff_spec = _peft_lists(model, targets, ff)
        return {
            "peft_type": "IA3",
            "target_modules": target_spec,
            "exclude_modules": None,
            "feedforward_modules": ff_spec,
            "fan_in_fan_out": any(model.get_submodule(t).fan_in_fan_out for t in targets),
            "modules_to_save": self.modules_to_save,
            "init_ia3_weights": self.init == "ones",
        }

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return True

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> IA3Config:
        return cls(
            target_modules=_listify(d.get("target_modules")),
            exclude=_listify(d.get("exclude_modules")),
            feedforward_modules=_listify(d.get("feedforward_modules")),
            modules_to_save=d.get("modules_to_save"),
            init="ones" if d.get("init_ia3_weights", True) else "random",
        )


def peft_is_feedforward(spec: TargetSpec, name: str) -> bool:
    """PEFT's test (``IA3Model._check_target_module_feedforward``): regex fullmatch, or a plain name suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(key) for key in spec or [])


def _listify(value: Any) -> Any:
    # PEFT stores its sets as lists in JSON; keep strings (regexes) and None as they are
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def _peft_lists(model: nn.Module, targets: list[str], ff: list[str]) -> tuple[list[str], list[str]]:
    """``target_modules`` and ``feedforward_modules`` for the file: short suffixes when they select exactly
    ``targets`` and ``ff`` under PEFT's rules (with ``ff`` a subset of the targets list), full names otherwise."""
    target_spec = compact_targets(model, targets)
    if target_spec != sorted(targets):  # suffix form
        ff_spec = sorted({t.split(".")[-1] for t in ff})
        if set(ff_spec) <= set(target_spec) and [t for t in targets if peft_is_feedforward(ff_spec, t)] == ff:
            return target_spec, ff_spec
    return sorted(targets), sorted(ff)


class IA3Linear(AdapterLayer):
    """``nn.Linear`` or GPT-2 ``Conv1D`` with (IA)³ scaling vectors, one per adapter name.

    Each adapter scales the output (vector (out, 1)) or, for feed-forward targets, the input (vector (1, in)).
    """

    adapter_attrs = ("ia3_l",)
    mergeable = True
    mixable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, feedforward: bool, init: str) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        dtype = self.base_layer.weight.dtype
        kw = {"device": self.base_layer.weight.device,
              "dtype": dtype if dtype in (torch.float32, torch.float64) else torch.float32}
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, **kw) if init == "ones" else torch.randn(shape, **kw))
        self.is_feedforward[name] = feedforward

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.is_feedforward.pop(adapter, None)

    # -- forward (AdapterLayer's): multiplicative, so the hooks scale the input and output ------------------
    def adapt_input(self, x: torch.Tensor, groups: list[tuple[str, Rows]]) -> torch.Tensor:
        scale = self._scale(x, [(n, rows) for n, rows in groups if self.is_feedforward[n]], self.in_features)
        return x if scale is None else (x * scale).to(x.dtype)  # (..., in)

    def adapt_output(self, x: torch.Tensor, base: torch.Tensor, groups: list[tuple[str, Rows]]) -> torch.Tensor:
        scale = self._scale(base, [(n, rows) for n, rows in groups if not self.is_feedforward[n]], self.out_features)
        return base if scale is None else (base * scale).to(base.dtype)  # (..., out)

    def _scale(self, t: torch.Tensor, groups: list[tuple[str, Rows]], width: int) -> torch.Tensor | None:
        """What ``t`` is multiplied by: the product of the adapters' vectors, (width,), when they apply to every
        row; in a mixed batch each row's own adapter's vector, (B, 1, ..., width). None: no adapter."""
        if not groups:
            return None
        if groups[0][1] is not None:  # mixed batch: rows given
            return self._row_scales(t, groups, width)
        scale = None
        for name, _ in groups:
            vec = self.ia3_l[name].flatten()
            scale = vec if scale is None else scale * vec
        return scale

    def _row_scales(self, t: torch.Tensor, groups: list[tuple[str, torch.Tensor]], width: int) -> torch.Tensor:
        """(B, 1, ..., width) per-row scales for ``t``: each row's adapter's vector, ones for the other rows."""
        first = self.ia3_l[groups[0][0]]
        scales = torch.ones(t.shape[0], width, dtype=first.dtype, device=first.device)  # (B, width)
        for name, rows in groups:
            scales = scales.index_copy(0, rows, self.ia3_l[name].flatten().expand(len(rows), width))
        return scales.view(t.shape[0], *([1] * (t.dim() - 2)), width)

    # -- merging: multiply the scale into W (and b), divide it back out --------------------------------
    def _apply_delta(self, adapter: str, sign: float) -> None:
        vec = self.ia3_l[adapter].detach().flatten()
        if sign < 0 and bool((vec == 0).any()):
            raise ValueError(f"cannot unmerge (IA)³ adapter {adapter!r}: its scale has exact zeros, so the merged "
                             "weights no longer hold the base weights")
        ff = self.is_feedforward[adapter]
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        # scale the input axis (ff) or the output axis of the stored weight: Linear (out, in), Conv1D (in, out)
        along_rows = ff == self.fan_in_fan_out
        factor = (vec.view(-1, 1) if along_rows else vec.view(1, -1)).to(weight.dtype)
        with torch.no_grad():
            if sign > 0:
                weight.mul_(factor)
            else:
                weight.div_(factor)
            if not ff and bias is not None:  # output scaling scales the bias too
                if sign > 0:
                    bias.mul_(vec.to(bias.dtype))
                else:
                    bias.div_(vec.to(bias.dtype))


def default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type, "all-linear")


@register("ia3", IA3Config, "(IA)³: learned per-feature scaling of chosen layers' outputs (inputs for FFN layers); mergeable")
def attach_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)  # the model's, not a method fact
    return attach_layers(model, config, method="(IA)³", own=IA3Linear, default_targets=default_targets,
                         make=IA3Linear, accept=is_linear_like,
                         add=lambda layer, name: layer.add_adapter(adapter_name, config.is_feedforward(name, model_type),
                                                                   config.init))
