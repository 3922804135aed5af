"""The one module-replacement mechanism, and attaching / detaching methods on a built model."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

from peftkit.core.adapter import (
    DEFAULT_ADAPTER,
    STATE_ATTR,
    AdapterLayer,
    adapter_layers,
    ensure_state,
    get_state,
    mark_only_adapters_trainable,
    set_active,
    untie_modules_to_save,
)
from peftkit.core.config import MethodConfig, TargetedConfig
from peftkit.core.identity import param_samples
from peftkit.core.registry import get_method
from peftkit.core.targeting import TargetSpec, find_targets
from peftkit.errors import ConfigError, NotMergeableError


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_modules(model: nn.Module, names: list[str], wrap: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named submodule by ``wrap(name, module)`` (which may return the module itself).

    Raises:
        ConfigError: a module would be wrapped inside another method's wrapper of a whole block, or would wrap a
            block holding another method's adapter layers (see :func:`refuse_nesting`).
    """
    for name in names:  # all checked before anything is wrapped: a refused attach leaves the model as it was
        refuse_nesting(model, name, model.get_submodule(name))
    for name in names:
        old = model.get_submodule(name)
        new = wrap(name, old)
        new.train(old.training)  # new submodules (dropout) follow the model's mode: eval stays deterministic
        if new is not old:
            replace_module(model, name, new)


def attach_layers(
    model: nn.Module,
    config: TargetedConfig,
    *,
    method: str,
    own: type[AdapterLayer] | tuple[type[AdapterLayer], ...],
    make: Callable[[nn.Module], AdapterLayer | None],
    add: Callable[[AdapterLayer, str], None],
    default_targets: Callable[[nn.Module], TargetSpec],
    adopt: Callable[[AdapterLayer, str], AdapterLayer | None] | None = None,
    accept: Callable[[nn.Module], bool] | None = None,
) -> list[str]:
    """Wrap each module ``config`` targets in the method's adapter layer and add one adapter to it (the attach of
    LoRA, DoRA and (IA)³).

    Args:
        method: the method's name in messages ("LoRA").
        own: the method's layer classes: a module already wrapped in one gets one more adapter.
        make: the method's layer around a plain module, or None when it cannot wrap that kind of module.
        add: adds the adapter to a layer, ``add(layer, module_name)``.
        default_targets: the targets when ``config.target_modules`` is None (the model family's usual ones).
        adopt: takes over another method's layer, or None when it cannot (DoRA takes LoRA layers over).
        accept: which module kinds can be targets (see :func:`~peftkit.core.targeting.find_targets`).

    Returns:
        The wrapped modules' names.

    Raises:
        ConfigError: a target is adapted by another method already, or is of a kind the method cannot adapt.
    """
    spec = config.target_modules if config.target_modules is not None else default_targets(model)
    targets = find_targets(model, spec, config.exclude, config.layers, accept=accept)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, own):
            layer = module  # another adapter on an already wrapped module
        elif isinstance(module, AdapterLayer):
            layer = adopt(module, name) if adopt is not None else None
            if layer is None:
                raise ConfigError(f"module {name!r} is already adapted by another method ({type(module).__name__})")
        else:
            layer = make(module)
            if layer is None:  # find_targets only returns the kinds accept allows
                raise ConfigError(f"{method} cannot adapt module {name!r} of type {type(module).__name__}")
        add(layer, name)
        return layer

    wrap_modules(model, targets, wrap)
    return targets


def refuse_nesting(model: nn.Module, name: str, module: nn.Module) -> None:
    """Adapter layers never nest: a method that wraps a whole block (bottleneck adapters and LLaMA-Adapter wrap
    ``self_attn``/``mlp``) and a method that wraps layers inside it (LoRA on ``q_proj``) cannot share that block.

    Nested, the inner adapter's module paths would change under it (``self_attn.base_layer.q_proj``): its file
    keys would no longer be PEFT's and saving or unloading it would fail. Put the two methods on different blocks
    (e.g. bottleneck ``placement: ffn`` with LoRA on attention projections) or use one of them.

    Raises:
        ConfigError: naming both modules and the adapter layer types.
    """
    parts = name.split(".")
    for i in range(1, len(parts)):
        outer = model.get_submodule(".".join(parts[:i]))
        if isinstance(outer, AdapterLayer):
            raise ConfigError(_nesting_message(".".join(parts[:i]), outer, name))
    for inner_name, inner in module.named_modules():
        if inner_name and isinstance(inner, AdapterLayer):
            raise ConfigError(_nesting_message(name, None, f"{name}.{inner_name}", inner))


def _nesting_message(block: str, outer: nn.Module | None, inner_name: str, inner: nn.Module | None = None) -> str:
    inner_name = inner_name.replace(".base_layer.", ".")  # the path as the user knows it
    if outer is not None:
        what = f"{inner_name!r}: it sits inside {block!r}, which {type(outer).__name__} already wraps as a whole"
    else:
        what = f"{block!r}: it holds {inner_name!r}, already adapted by {type(inner).__name__}"
    return (f"cannot adapt {what}; a method wrapping a whole block and one wrapping layers inside it cannot share "
            "that block: put them on different blocks (e.g. bottleneck placement=ffn with LoRA on attention) or "
            "use one of them")


def inject(model: nn.Module, config: MethodConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Attach a method to ``model`` in place and leave only the adapter trainable.

    The first adapter becomes the active one; later ones are loaded inactive (see ``set_active``).

    Returns:
        The same model object, for chaining.

    Raises:
        ValueError: an adapter of that name exists, or the config's targets match nothing.
    """
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", adapter_name):
        raise ConfigError(f"invalid adapter name {adapter_name!r}: use letters, digits, '-' or '_'")
    state = ensure_state(model)
    if adapter_name in state.configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if state.base_samples is None:  # the base before any adapter changes it (merging, quantizing, training)
        state.base_samples = param_samples(model)
    method = get_method(config.method_name)
    try:
        targets = method.attach(model, config, adapter_name)
    except Exception:
        if not state.configs:
            object.__delattr__(model, STATE_ATTR)
        raise
    untie_modules_to_save(model, config)  # a tied head in modules_to_save gets its own copy, as in PEFT
    state.configs[adapter_name] = config
    state.targets[adapter_name] = list(targets or [])
    set_active(model, state.active or [adapter_name])
    mark_only_adapters_trainable(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (forward then costs what the base costs).

    Raises:
        NotMergeableError: an active adapter's method cannot be merged (e.g. bottleneck adapters); nothing is merged.
        NotMergeableError: a weight to merge into is shared with another module (tied input/output embeddings).
    """
    _refuse_unmergeable(model)
    _refuse_tied_merge(model)
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def _refuse_unmergeable(model: nn.Module) -> None:
    # Checked up front so that a model mixing methods is never left half merged.
    state = get_state(model)
    for name, layer in adapter_layers(model):
        active = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if active and not layer.mergeable:
            config = state.configs.get(active[0])
            method = (config.method_name if config is not None else "") or type(layer).__name__
            raise NotMergeableError(
                f"adapter {active[0]!r} ({method}) cannot be merged into the base weights: what it adds at {name!r} "
                "is no change of a weight; keep the adapter unmerged (unloading without merge removes it)")


def _refuse_tied_merge(model: nn.Module) -> None:
    # Merging into a tied weight (GPT-2's wte is lm_head's weight) would change the other module too.
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in adapter_layers(model):
        if not [a for a in layer.active_adapters if a not in layer.merged_adapters]:
            continue
        weight = getattr(layer.base_layer, "weight", None)
        others = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if others:
            raise NotMergeableError(f"cannot merge the adapter of {name!r}: its weight is tied to {others[0]!r}, which "
                                    "merging would change too; keep the adapter unmerged or untie the weights")


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights (up to float rounding)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter layer, giving back the plain base model.

    Args:
        merge: fold the active adapters into the base weights first (a standalone fine-tuned model);
            otherwise the base is returned unchanged.
    """
    state = get_state(model)
    in_place = [a for a, c in state.configs.items() if c.in_place]
    if in_place and not merge:
        raise ConfigError(f"adapter {in_place[0]!r} trained the base weights in place: unloading cannot give the "
                          "original base back (use unload(model, merge=True) for the tuned model, or reload the base)")
    if merge:
        _refuse_unmergeable(model)
        _refuse_tied_merge(model)
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.release())
    object.__delattr__(model, STATE_ATTR)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one named adapter; the model keeps the others."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; loaded: {', '.join(state.configs)}")
    for name, layer in list(adapter_layers(model)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names():
            replace_module(model, name, layer.release())
    del state.configs[adapter_name], state.targets[adapter_name]
    state.active = [a for a in state.active if a != adapter_name]
