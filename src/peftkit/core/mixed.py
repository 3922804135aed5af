"""Mixed batches: one forward (or ``generate``) call in which each row of the batch uses its own adapter.

    with mixed_batch(model, ["sentiment", "chat", BASE, "sentiment"]):
        logits = model(input_ids=ids).logits            # row i as if only its adapter were active
        out = model.generate(input_ids=ids, ...)          # KV-cached decoding too

As Hugging Face PEFT's ``adapter_names=`` argument: the base layer runs once on the whole batch and each
adapter's change is computed only on its own rows (sub-batch indexing), so one call serves several tasks
from one base. Rows named ``"__base__"`` (:data:`BASE`) get the base model.

How the layers learn the assignment: for the duration of the block every adapter layer that supports mixed
batches (its class declares ``mixable``: LoRA, QLoRA, DoRA, (IA)³) gets the row assignment in its
``mixed_rows`` attribute, which its ``forward`` reads; every other adapter layer is disabled (the layers of
adapters that no row names). Layers that cannot give each row its own adapter refuse up front
(:class:`~peftkit.errors.ConfigError` naming the method): soft prompts and prefixes change the sequence,
LLaMA-Adapter and bottleneck adapters are not wired for it, in-place methods (selective, BitFit, full
fine-tuning, LoRA with trained biases or ``modules_to_save``) have changed the base itself, and merged
adapters are part of every row's weights.

The assignment is read at each forward, so backward passes that recompute the forward (gradient
checkpointing) must run inside the block too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator, Sequence

import torch
import torch.nn as nn

from peftkit.core.adapter import STATE_ATTR, AdapterLayer, AdapterState, adapter_layers
from peftkit.errors import ConfigError

BASE = "__base__"  # the row uses no adapter (PEFT's name for it too)


class MixedRows:
    """Which adapter each row of the batch uses, grouped by adapter for sub-batch indexing.

    Attributes:
        names: one adapter name (or ``"__base__"``) per batch row.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            if name != BASE:
                groups.setdefault(name, []).append(i)
        self._groups = {name: torch.tensor(rows, dtype=torch.long) for name, rows in groups.items()}

    def groups(self, x: torch.Tensor, held: Container[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(adapter, row indices (n,))`` for each adapter of ``held`` that some row uses.

        Args:
            x: the layer's input, batch first.
            held: the adapters the calling layer has (others leave their rows as the base).

        Raises:
            ConfigError: the batch does not have one row per name.
        """
        if x.shape[0] != len(self.names):
            raise ConfigError(f"mixed batch: {len(self.names)} adapter names for a batch of {x.shape[0]} rows "
                              "(give one name per row; repeat each name for beam search or num_return_sequences)")
        for name, rows in self._groups.items():
            if name in held:
                if rows.device != x.device:
                    rows = self._groups[name] = rows.to(x.device)
                yield name, rows


def supports_mixed(layer: nn.Module) -> bool:
    """Can this adapter layer give each batch row its own adapter?"""
    return isinstance(layer, AdapterLayer) and layer.mixable


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    Active, inactive and disabled adapters alike: only the names given count. Nested blocks restore the outer
    assignment on exit.

    Raises:
        ConfigError: no adapters on the model, an unknown name, a merged adapter, an adapter whose method cannot
            be mixed (named), or an adapter that changed the base weights in place (whose effect every row
            would share).
    """
    rows = MixedRows(_check_names(model, adapter_names))
    state: AdapterState = getattr(model, STATE_ATTR)
    _refuse_in_place(state)
    named = set(rows.names) - {BASE}
    layers = list(adapter_layers(model))
    for name, layer in layers:
        _refuse_layer(name, layer, named, state)
    saved = [(layer, layer.disabled, layer.mixed_rows) for _, layer in layers]
    try:
        for _, layer in layers:
            if supports_mixed(layer):
                layer.mixed_rows = rows
            else:  # holds none of the named adapters (checked): the base for every row
                layer.disabled = True
        yield
    finally:
        for layer, disabled, previous in saved:
            layer.disabled = disabled
            if supports_mixed(layer):
                layer.mixed_rows = previous


def _check_names(model: nn.Module, adapter_names: Sequence[str]) -> list[str]:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConfigError("mixed batch: this model has no peftkit adapters (inject or load some first)")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ConfigError(f"mixed batch: adapter_names must be a non-empty list with one adapter name per batch "
                          f"row, got {adapter_names!r}")
    for name in adapter_names:
        if name != BASE and name not in state.configs:
            raise ConfigError(f"mixed batch: no adapter named {name!r}; loaded adapters: "
                              f"{', '.join(state.configs) or '(none)'} (or {BASE!r} for the base model)")
    return list(adapter_names)


def _method(state: AdapterState, adapter: str) -> str:
    config = state.configs.get(adapter)
    return (config.method_name if config is not None else "") or "unknown method"


def _refuse_in_place(state: AdapterState) -> None:
    # Any loaded adapter that changed base parameters changes every row, named or not.
    for adapter, config in state.configs.items():
        if config.in_place:
            raise ConfigError(f"mixed batches are not supported by {config.method_name} (adapter {adapter!r}): it "
                              "trains the base weights in place, so no row can see the base without it")
        if config.trains_base_tensors():  # not in place: its biases or modules_to_save
            extras = [f"bias={config.bias!r}"] if config.bias != "none" else []
            extras += ["modules_to_save"] if config.modules_to_save else []
            raise ConfigError(f"mixed batches are not supported for adapter {adapter!r} ({config.method_name} with "
                              f"{' and '.join(extras)}): it trains base parameters in place, which every row shares")


def _refuse_layer(name: str, layer: AdapterLayer, named: set[str], state: AdapterState) -> None:
    if layer.merged_adapters:
        adapter = layer.merged_adapters[0]
        raise ConfigError(f"mixed batch: adapter {adapter!r} ({_method(state, adapter)}) is merged into the base "
                          f"weights at {name!r}; unmerge it first (peftkit.unmerge(model))")
    if supports_mixed(layer):
        return
    for adapter in layer.adapter_names():
        if adapter in named:
            raise ConfigError(f"mixed batches are not supported by {_method(state, adapter)} (adapter {adapter!r}): "
                              f"its layer {name!r} ({type(layer).__name__}) cannot give each batch row its own "
                              "adapter; mixed batches work with lora, qlora, dora and ia3 adapters")
