"""What every method shares: the adapter-layer protocol and the generic helpers built on it.

Adapter parameters are found by what they are (modules deriving from :class:`AdapterLayer`), never by
matching parameter names, so freezing, counting, disabling, saving and merging are written once.

Each adapter layer keeps its weights in ``nn.ModuleDict``/``nn.ParameterDict`` attributes keyed by
adapter name (``q_proj.lora_A.default.weight``), which is also Hugging Face PEFT's layout: several named
adapters can live on one model, and file keys are the module keys with the adapter name removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from peftkit.core.config import MethodConfig
from peftkit.errors import NotMergeableError, PeftkitError

if TYPE_CHECKING:
    from peftkit.core.mixed import MixedRows

DEFAULT_ADAPTER = "default"
STATE_ATTR = "peftkit_state"


#: which batch rows an adapter changes: an index tensor (n,), or None for every row
Rows = torch.Tensor | None


class AdapterLayer(nn.Module):
    """Base of every module a method inserts.

    Subclasses list in ``adapter_attrs`` the ``ModuleDict``/``ParameterDict`` attributes that hold
    per-adapter weights. Layers that add a change to a wrapped layer's output (LoRA, DoRA, (IA)³) implement
    :meth:`delta` and inherit ``forward`` and ``mixed_forward`` (one adapter per batch row) written once here,
    the shape PEFT reached with its LoRA variants; others (prompts, bottleneck adapters) override ``forward``.
    Merging methods also implement ``delta_weight`` (or override ``merge``/``unmerge``).
    """

    adapter_attrs: tuple[str, ...] = ()
    mergeable: bool = False
    #: can each batch row use its own adapter (core.mixed)? True for the layers written around delta()
    mixable: ClassVar[bool] = False
    mixed_rows: MixedRows | None = None  # one adapter per batch row, set by core.mixed.mixed_batch

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # Model code sometimes reads a layer's weight directly (T5's feed-forward checks ``self.wo.weight.dtype``):
    # the wrapper answers with the wrapped layer's tensors.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- forward: the base layer, then each adapter's change ------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mixed_rows is not None:
            return self.mixed_forward(x, *args, **kwargs)
        adapters = self.use_adapters()  # first: a disabled layer unmerges before the base runs
        return self._adapted(x, [(name, None) for name in adapters], args, kwargs)

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base on the whole batch, each adapter's change only on its own rows (``mixed_rows``)."""
        return self._adapted(x, list(self.mixed_rows.groups(x, self.adapter_names())), args, kwargs)

    def _adapted(self, x: torch.Tensor, groups: list[tuple[str, Rows]], args: tuple, kwargs: dict) -> torch.Tensor:
        x = self.adapt_input(x, groups)
        base = self.base_layer(x, *args, **kwargs)  # (B, ..., out)
        return self.adapt_output(x, base, groups)

    def adapt_input(self, x: torch.Tensor, groups: list[tuple[str, Rows]]) -> torch.Tensor:
        """The input the base layer sees; unchanged by default ((IA)³ scales feed-forward inputs)."""
        return x

    def adapt_output(self, x: torch.Tensor, base: torch.Tensor, groups: list[tuple[str, Rows]]) -> torch.Tensor:
        """The base output ``base`` plus each adapter's :meth:`delta`, on its rows only in a mixed batch."""
        result = base
        for name, rows in groups:
            if rows is None:
                result = self.add_delta(name, x, base, result)
            else:
                result = result.index_add(0, rows, self.delta(name, x[rows], base[rows]).to(result.dtype))
        return result

    def delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """What adapter ``name`` adds to the base output ``base`` (..., out) of input ``x``."""
        raise TypeError(f"{type(self).__name__} defines no output change")

    def add_delta(self, name: str, x: torch.Tensor, base: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus adapter ``name``'s :meth:`delta` (a layer may fuse the sum, as LoRA's one GEMM)."""
        return result + self.delta(name, x, base).to(result.dtype)

    # -- bookkeeping -----------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_attrs[0])
        return list(first.keys())

    def adapter_named_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """``(key_without_adapter_name, parameter)`` for one adapter, in PEFT's file-key form."""
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter not in container:
                continue
            item = container[adapter]
            if isinstance(item, nn.Parameter):
                yield attr, item
            else:
                for sub, p in item.named_parameters():
                    yield f"{attr}.{sub}", p

    def release(self) -> nn.Module:
        """Called when this layer leaves the model: undo its side effects (e.g. hooks it installed on the model)
        and return the module that takes its place, the wrapped layer."""
        return self.base_layer

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged; unmerge it before deleting it")
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter in container:
                del container[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    # -- merging ------------------------------------------------------------------------
    def merge(self, adapters: list[str] | None = None) -> None:
        if not self.mergeable:
            raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")
        for name in adapters or self.active_adapters:
            if name in self.merged_adapters:
                continue
            self._apply_delta(name, +1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    def _apply_delta(self, adapter: str, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight(adapter)
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype), alpha=sign)

    def delta_weight(self, adapter: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} defines no weight delta")

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def use_adapters(self) -> list[str]:
        """Adapters to compute in forward: none when disabled (merged ones are unmerged first)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]


@dataclass
class AdapterState:
    """Per-model record of the adapters attached to it (stored as ``model.peftkit_state``)."""

    configs: dict[str, MethodConfig] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    #: samples of the base weights taken when the first adapter was attached (core/identity.py); None: unknown
    base_samples: dict[str, Any] | None = None


def get_state(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no peftkit adapters: call peftkit.inject(model, config) first")
    return state


def ensure_state(model: nn.Module) -> AdapterState:
    if getattr(model, STATE_ATTR, None) is None:
        # object.__setattr__: a plain attribute, not a submodule or buffer
        object.__setattr__(model, STATE_ATTR, AdapterState())
    return getattr(model, STATE_ATTR)


def default_lr(model: nn.Module) -> float:
    """The learning rate ``train.lr: null`` means for ``model``: its (first) active adapter's method's declared
    ``default_lr``, as a run config resolves it; the base class's for a model without adapters."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or not state.active:
        return MethodConfig.default_lr
    return state.configs[state.active[0]].default_lr


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            yield name, mod


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """``(file_key, parameter)`` for the adapter's own parameters, keys as in PEFT files (no prefix)."""
    state = get_state(model)
    names = [adapter] if adapter else list(state.configs)
    for layer_name, layer in adapter_layers(model):
        for a in names:
            for key, p in layer.adapter_named_parameters(a):
                yield f"{layer_name}.{key}" if layer_name else key, p
    for a in names:
        for key, p in _extra_trainable(model, state.configs[a]):
            yield key, p


def _extra_trainable(model: nn.Module, config: MethodConfig) -> Iterator[tuple[str, nn.Parameter]]:
    """Base parameters a config asks to train and save too: biases (``bias``) and ``modules_to_save``, or
    the whole selection of methods that train base parameters in place (``trainable_base_parameters``)."""
    selected: set[int] = set()
    for name, p in config.trainable_base_parameters(model):  # in place: the selection (no others select)
        selected.add(id(p))
        yield name, p
    bias = "none" if config.in_place else config.bias  # in place: + modules_to_save it leaves out (a classifier head)
    extra = list(config.modules_to_save or [])
    if bias == "none" and not extra:
        return
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for a in layer.adapter_names()
                   for _, p in layer.adapter_named_parameters(a)}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids or id(p) in selected:
            continue
        module_name = name.rsplit(".", 1)[0]
        if any(module_name == m or module_name.endswith("." + m) for m in extra):
            yield name, p
        elif name.endswith(".bias") and (bias == "all" or (bias == "lora_only" and ".base_layer." in name)):
            yield name, p


def untie_modules_to_save(model: nn.Module, config: MethodConfig) -> list[str]:
    """Give each ``modules_to_save`` module parameters of its own where it shares them with a module outside it
    (an output head tied to the input embeddings, as in GPT-2 or SmolLM2), and return their names.

    This is what PEFT does: it trains and saves a copy of such a module, so the saved tensor replaces that module
    only and the module it was tied to keeps the base's weights. The copy starts equal to the shared weight (the
    model's outputs are unchanged); the model's config then says the word embeddings are not tied, so a merged
    export keeps the head it trained.
    """
    extra = list(config.modules_to_save or [])
    if not extra:
        return []
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    untied = []
    for module_name, module in list(model.named_modules()):
        if not any(module_name == m or module_name.endswith("." + m) for m in extra):
            continue
        for pname, p in list(module.named_parameters(remove_duplicate=False)):
            full = f"{module_name}.{pname}"
            if all(o.startswith(module_name + ".") for o in owners.get(id(p), [])):
                continue  # not shared outside the module
            owner, _, attr = full.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            untied.append(full)
    cfg = getattr(model, "config", None)
    if untied and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
    return untied


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze the active adapters' parameters."""
    state = get_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for a in state.active:
        for _, p in adapter_parameters(model, a):
            p.requires_grad_(True)


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (shared/tied tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model behaves exactly as its base (merged adapters are unmerged)."""
    state = getattr(model, STATE_ATTR, None)
    in_place = [a for a in (state.active if state else []) if state.configs[a].in_place]
    if in_place:
        raise PeftkitError(f"adapter {in_place[0]!r} ({state.configs[in_place[0]].method_name}) trains the base "
                           "weights in place: there is no separate adapter to turn off (load a fresh base instead)")
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, b in zip(layers, before):
            layer.disabled = b


def set_active(model: nn.Module, adapters: str | list[str]) -> None:
    """Make ``adapters`` the active ones on every layer (others stay loaded but unused)."""
    state = get_state(model)
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    for a in names:
        if a not in state.configs:
            raise ValueError(f"no adapter named {a!r}; loaded adapters: {', '.join(state.configs) or '(none)'}")
    state.active = names
    for _, layer in adapter_layers(model):
        layer.unmerge()
        layer.active_adapters = [a for a in names if a in layer.adapter_names()]
