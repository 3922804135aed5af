"""Selective fine-tuning: train a chosen subset of the model's own parameters, in place.

No module is added; the method only decides which base parameters have ``requires_grad``. The subset is
the intersection of the filters given: parameter-name patterns, transformer-block indices (negative
counts from the top: ``layers: [-2, -1]`` is "train the last two layers"), and kinds of parameter
(``norm``, ``embedding``, ``attention``, ``mlp``, ``head``, ``bias``) — ``kinds: [norm]`` is LayerNorm
tuning. BitFit, linear probing and full fine-tuning are the same mechanism with a fixed selection
(their own files). The saved "adapter" holds just the selected tensors under PEFT-style keys, in a
peftkit-only file type (PEFT has no such method); loading writes them back into a fresh base.

Because the base weights change in place there is no separate adapter to switch off: ``disable_adapters``
and ``unload`` (without merge) refuse with a clear error instead of silently returning the tuned model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn as nn

from peftkit.core.config import MethodConfig, check
from peftkit.core.registry import register
from peftkit.core.targeting import layer_index, name_matches, output_head_names
from peftkit.errors import ConfigError

Kind = Literal["norm", "embedding", "attention", "mlp", "head", "bias"]
KINDS = ("norm", "embedding", "attention", "mlp", "head", "bias")
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "ffn", "feed_forward", "intermediate", "DenseReluDense")


@dataclass
class InPlaceConfig(MethodConfig):
    """Base of the methods that train base parameters in place (no adapter modules).

    Attributes:
        modules_to_save: base modules trained and saved besides the selection (PEFT's name), e.g. the
            classification head of a ``task: seq_cls`` run, which adds it itself.
    """

    in_place: ClassVar[bool] = True

    modules_to_save: list[str] | None = None

    def trainable_base_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        raise NotImplementedError  # pragma: no cover - each subclass selects

    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "peftkit_method": self.method_name, **dataclasses.asdict(self)}

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return True

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> InPlaceConfig:
        from peftkit.core.config import from_dict

        fields = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {k: v for k, v in d.items() if k in fields}, "adapter_config.")


def attach_in_place(model: nn.Module, config: InPlaceConfig, adapter_name: str) -> list[str]:
    """Check the selection is not empty; there is nothing to wrap."""
    chosen = [n for n, _ in config.trainable_base_parameters(model)]
    if not chosen:
        raise ConfigError(config.empty_selection_message(model))
    return []


@dataclass
class SelectiveConfig(InPlaceConfig):
    """Attributes:
        patterns: parameter names or suffixes (a list, e.g. ``[q_proj.weight]``) or one regex string.
        layers: transformer-block indices; negative ones count from the top (-1 is the last block).
        kinds: any of norm, embedding, attention, mlp, head, bias.
    """

    default_lr = 1e-4

    peft_type: ClassVar[str] = "PEFTKIT_SELECTIVE"

    patterns: list[str] | str | None = None
    layers: list[int] | None = None
    kinds: list[Kind] | None = None

    def validate(self) -> None:
        check(self.patterns is not None or self.layers is not None or self.kinds is not None,
              "method: selective needs at least one of patterns, layers, kinds (e.g. method.kinds=[norm])")
        for k in self.kinds or []:
            check(k in KINDS, f"method.kinds: {k!r} is not one of {', '.join(KINDS)}")

    def trainable_base_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        n_layers = _num_layers(model)
        layers = None if self.layers is None else {i % n_layers if n_layers else i for i in self.layers}
        kinds = _param_kinds(model) if self.kinds else {}
        for name, p in _base_parameters(model):
            if self.patterns is not None and not name_matches(name, self.patterns):
                continue
            if layers is not None and layer_index(name) not in layers:
                continue
            if self.kinds and not (kinds.get(name, set()) & set(self.kinds)):
                continue
            yield name, p

    def empty_selection_message(self, model: nn.Module) -> str:
        return (f"the selection (patterns={self.patterns!r}, layers={self.layers!r}, kinds={self.kinds!r}) matches no "
                f"parameter; the model has {_num_layers(model)} layers and parameters such as "
                f"{', '.join(n for n, _ in list(_base_parameters(model))[:4])}")


def _base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters of the base model, skipping adapter modules of other methods."""
    from peftkit.core.adapter import adapter_layers

    adapter_ids = {id(p) for _, layer in adapter_layers(model) for a in layer.adapter_names()
                   for _, p in layer.adapter_named_parameters(a)}
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            yield name, p


def _num_layers(model: nn.Module) -> int:
    indices = {layer_index(n) for n, _ in model.named_parameters()} - {None}
    return max(indices) + 1 if indices else 0


def _param_kinds(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the kinds it belongs to (judged by module type and name)."""
    heads = output_head_names(model)
    kinds: dict[str, set[str]] = {}
    for mod_name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            k = kinds.setdefault(full, set())
            if "norm" in type(mod).__name__.lower():
                k.add("norm")  # a norm is a norm, even inside an attention block (post_attention_layernorm)
            elif isinstance(mod, nn.Embedding):
                k.add("embedding")
            elif mod_name in heads:
                k.add("head")
            elif any(a in mod_name for a in _ATTENTION):
                k.add("attention")
            elif any(m in mod_name for m in _MLP) or mod_name.endswith(("output.dense", "fc1", "fc2", "c_fc")):
                k.add("mlp")
            if pname == "bias":
                k.add("bias")
    return kinds


@register("selective", SelectiveConfig, "selective: train chosen base parameters in place (by name, layer range, kind)")
def attach_selective(model: nn.Module, config: SelectiveConfig, adapter_name: str) -> list[str]:
    return attach_in_place(model, config, adapter_name)
