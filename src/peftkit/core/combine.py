"""Combining adapters into a new one: the plumbing that does not depend on the method.

What a combination request may ask (:data:`COMBINATIONS`, :func:`check_options`), which loaded adapters may be
combined (the method's config says so: ``MethodConfig.combinable``; same modules; no trained base tensors), and
the source folders (same base model, loading them under distinct names). The algebra is the method's: for LoRA
(and QLoRA, whose files are LoRA files) :mod:`peftkit.methods.lora_combine`; writing the result to a folder is
:mod:`peftkit.runs.combine` (``peftkit merge`` with several adapters).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from peftkit.core.adapter import get_state
from peftkit.core.registry import METHODS, _load_builtin_methods
from peftkit.errors import AdapterFileError, ConfigError

Combination = Literal["cat", "linear", "svd", "ties", "dare", "dare_ties"]
COMBINATIONS: dict[str, str] = {
    "cat": "exact weighted sum, ranks concatenated (= applying the adapters together)",
    "linear": "exact weighted sum of deltas (task arithmetic); stored as cat",
    "svd": "exact weighted sum re-compressed to --rank by truncated SVD",
    "ties": "TIES-merging: trim to top-density magnitudes, elect signs, disjoint mean; SVD to --rank",
    "dare": "DARE: random drop (keep density), rescale 1/density, weighted sum; SVD to --rank",
    "dare_ties": "DARE's drop, then TIES' sign election and disjoint mean; SVD to --rank",
}
EXACT = ("cat", "linear")
PRUNED = ("ties", "dare", "dare_ties")
SignMethod = Literal["total", "frequency"]
SIGN_METHODS: tuple[str, ...] = SignMethod.__args__


# -- the request --------------------------------------------------------------------------------------------------
def check_request(model: nn.Module, adapters: list[str], weights: list[float], combination: str, new_name: str,
                  density: float | None, rank: int | None, sign_method: str) -> None:
    """ConfigError naming the problem when a request cannot be run on ``model`` (see :func:`check_options`)."""
    state = get_state(model)
    check_options(len(adapters), weights, combination, density, rank, sign_method)
    for a in adapters:
        if a not in state.configs:
            raise ConfigError(f"combine: no adapter named {a!r}; loaded adapters: {', '.join(state.configs) or '(none)'}")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"combine: an adapter is listed twice in {adapters} (give it one summed weight instead)")
    if new_name in state.configs:
        raise ConfigError(f"combine: the model already has an adapter named {new_name!r}; choose another new_name")


def check_options(n_adapters: int, weights: list[float], combination: str, density: float | None,
                  rank: int | None, sign_method: str) -> None:
    """ConfigError naming the option when a combination request is malformed (no model needed)."""
    if n_adapters < 1:
        raise ConfigError("combine: give at least one adapter to combine")
    if len(weights) != n_adapters:
        raise ConfigError(f"combine: {len(weights)} weights for {n_adapters} adapters; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"combine: weights must be finite numbers, got {weights}")
    if combination not in COMBINATIONS:
        raise ConfigError(f"combine: unknown combination {combination!r}; valid: {', '.join(COMBINATIONS)}")
    _check_density(combination, density)
    if rank is not None:
        if combination in EXACT:
            raise ConfigError(f"combine: {combination!r} is exact (its rank is the sum of the sources' ranks); "
                              "rank applies to svd, ties, dare and dare_ties")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"combine: rank must be an integer >= 1, got {rank!r}")
    if sign_method not in SIGN_METHODS:
        raise ConfigError(f"combine: majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")


def _check_density(combination: str, density: float | None) -> None:
    if combination in PRUNED:
        if density is None:
            raise ConfigError(f"combine: combination {combination!r} needs a density (fraction of each delta kept, "
                              "in (0, 1]; e.g. 0.2 for ties, 0.1-0.5 for dare)")
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ConfigError(f"combine: density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(f"combine: density applies to {', '.join(PRUNED)}, not to {combination!r}")


# -- the loaded sources -------------------------------------------------------------------------------------------
def check_sources(model: nn.Module, adapters: list[str]) -> list[str]:
    """The modules every source adapts, in model order; ConfigError if a source's method does not combine
    (its config's ``combinable``), it trained base tensors, or the sources adapt different modules."""
    state = get_state(model)
    for a in adapters:
        config = state.configs[a]
        method = config.method_name
        if not config.combinable:
            raise ConfigError(f"combine: adapter {a!r} is {method}: only plain LoRA adapters can be combined "
                              "(DoRA, IA3, bottleneck adapters and prompt methods add no low-rank weight delta)")
        if config.trains_base_tensors():
            raise ConfigError(f"combine: adapter {a!r} also trains base tensors (bias={config.bias!r}, "
                              f"modules_to_save={config.modules_to_save}), which no weight delta describes")
    first = set(state.targets[adapters[0]])
    for a in adapters[1:]:
        other = set(state.targets[a])
        if other != first:
            only_first, only_other = sorted(first - other), sorted(other - first)
            where = (f"only {adapters[0]!r} adapts {_few(only_first)}" if only_first else
                     f"only {a!r} adapts {_few(only_other)}")
            raise ConfigError(f"combine: adapters {adapters[0]!r} and {a!r} adapt different modules: {where}")
    return [n for n, _ in model.named_modules() if n in first]


def _few(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# -- adapter folders ---------------------------------------------------------------------------------------------
def check_adapter_files(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read the sources' ``adapter_config.json`` and refuse what cannot be combined, before any loading.

    The base model must be the same: when both adapters record a fingerprint of the base weights (peftkit's
    ``peftkit.json`` sidecar, see :mod:`peftkit.core.identity`, or a ``*fingerprint*`` key in the config) made the
    same way, those decide; otherwise ``base_model_name_or_path`` must agree (when both have one).

    Returns:
        The parsed configs, in order.

    Raises:
        AdapterFileError: a folder is no adapter, holds no plain LoRA adapter, or was made for another base.
    """
    from peftkit.core.identity import read_identity
    from peftkit.core.io import read_adapter_config

    configs = [read_adapter_config(p) for p in paths]
    for path, data in zip(paths, configs):
        if not _file_combinable(data):
            raise AdapterFileError(f"{path}: a {_file_method(data)} adapter; only plain LoRA adapters can be combined "
                                   "(DoRA, IA3, bottleneck adapters and prompt methods add no low-rank weight delta)")
    records = [{**data, **{k: v for k, v in read_identity(path).items() if v is not None}}
               for path, data in zip(paths, configs)]
    for path, record in zip(paths[1:], records[1:]):
        _check_same_base(paths[0], records[0], path, record)
    return configs


def _file_combinable(data: dict[str, Any]) -> bool:
    """Whether the method a file was written by (by ``peftkit_method``, else as ``load_adapter`` resolves PEFT's
    ``peft_type``) declares its adapters combinable."""
    _load_builtin_methods()
    own = METHODS.get(str(data.get("peftkit_method")))
    if own is not None:
        return own.config_cls.combinable
    return any(m.config_cls.combinable for m in METHODS.values()
               if m.config_cls.peft_type == data.get("peft_type") and m.config_cls.matches_peft(data))


def _file_method(data: dict[str, Any]) -> str:
    """The method's name for messages."""
    if data.get("peft_type") == "LORA":
        return "DoRA" if data.get("use_dora") else "lora"
    return str(data.get("peftkit_method") or data.get("peft_type"))


def _check_same_base(path0: Any, d0: dict[str, Any], path: Any, d: dict[str, Any]) -> None:
    fingerprints = sorted(k for k in set(d0) & set(d)
                          if "fingerprint" in k.lower() and "algorithm" not in k.lower() and d0[k] and d[k])
    same_way = all(d0.get(k) == d.get(k) for k in set(d0) & set(d) if "fingerprint_algorithm" in k.lower())
    if fingerprints and same_way:
        key = fingerprints[0]
        if d0[key] != d[key]:
            raise AdapterFileError(f"{path}: made for another base model than {path0} ({key} {str(d[key])[:12]!r} "
                                   f"vs {str(d0[key])[:12]!r}); adapters of different bases cannot be combined")
        return
    n0, n = _base_name(d0.get("base_model_name_or_path")), _base_name(d.get("base_model_name_or_path"))
    if n0 and n and n0 != n:
        raise AdapterFileError(f"{path}: made for base model {d['base_model_name_or_path']!r}, but {path0} for "
                               f"{d0['base_model_name_or_path']!r}; adapters of different bases cannot be combined")


def _base_name(name: Any) -> str | None:
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else os.path.normpath(str(name))


def source_names(paths: list[str | os.PathLike]) -> list[str]:
    """Adapter names for folders, from their names (``runs/a/adapter`` -> ``a-adapter`` when names collide)."""
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "adapter"

    names = [clean(Path(p).resolve().name) for p in paths]
    if len(set(names)) < len(names):
        names = [clean(f"{Path(p).resolve().parent.name}-{Path(p).resolve().name}") for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def load_sources(model: nn.Module, paths: list[str | os.PathLike], strict_base: bool = False) -> list[str]:
    """Check the folders (:func:`check_adapter_files`), load each as a named adapter; returns the names."""
    from peftkit.core.io import load_adapter

    check_adapter_files(paths)
    names = source_names(paths)
    for path, name in zip(paths, names):
        load_adapter(model, path, adapter_name=name, strict_base=strict_base)
    return names


__all__ = ["COMBINATIONS", "Combination", "EXACT", "PRUNED", "SignMethod", "check_adapter_files", "check_options",
           "check_request", "check_sources", "load_sources", "source_names"]
