r"""Combining LoRA adapters into a new one: task arithmetic, concatenation, SVD, TIES and DARE.

Each source adapter i adds, at every adapted module, a low-rank delta in LoRA's factor layout::

    delta_i = s_i · B_i · A_i        B_i: (out x r_i), A_i: (r_i x in), s_i = alpha_i / r_i (or / sqrt(r_i))

(for embeddings B is (dim x r) and A is (r x vocab): the same algebra on the transposed weight). The new adapter
is an ordinary LoRA adapter with scaling 1 (``alpha = r``) whose factors are:

* ``cat`` / ``linear`` -- the exact weighted sum (task arithmetic, Ilharco et al. 2023), stored by stacking ranks::

      Σ_i w_i·delta_i = [B_1 … B_n] · [w_1 s_1 A_1 ; … ; w_n s_n A_n]          rank Σ r_i, no approximation

  Every scaling (rsLoRA too) is folded into A, so the result equals applying the sources together (stacking).
  ``linear`` is the task-arithmetic name for the same sum. PEFT's ``linear`` instead sums A's and B's separately
  (B = Σ √(w_i s_i) B_i, A = Σ √(w_i s_i) A_i), which is *not* Σ w_i·delta_i (cross terms B_i·A_j appear); peftkit
  does not offer it.
* ``svd`` -- the exact sum re-compressed to ``rank`` by truncated SVD, Σ w_i delta_i ≈ U_k S_k V_kᵀ with
  B = U_k √S_k, A = √S_k V_kᵀ: the best rank-k approximation in Frobenius norm (Eckart-Young); the error is the
  norm of the dropped singular values. Default rank: the largest source rank (as PEFT). Computed from the stacked
  factors (QR of each side, SVD of the small Σr x Σr core), never by a dense (out x in) SVD.
* ``ties`` -- TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708) on the dense deltas: keep each
  delta's top ``density`` fraction of entries by magnitude, elect each entry's sign by the sign of the trimmed
  deltas' sum (``majority_sign_method="total"``) or of the count of signs (``"frequency"``), then average the
  weighted entries that agree with it (the "disjoint mean"); re-compressed to ``rank`` by SVD.
* ``dare`` -- DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop each delta entry with probability
  1 - ``density`` (seeded), rescale the kept ones by 1/density, weighted sum; re-compressed to ``rank`` by SVD.
* ``dare_ties`` -- DARE's drop and rescale, then TIES' sign election and disjoint mean; re-compressed by SVD.

For TIES and DARE the default rank is the sum of the sources' ranks (capped by the matrix size); their delta is
generally of full rank, so the compression drops its SVD tail (a larger rank drops less).
These are PEFT's ``svd``, ``ties_svd``, ``dare_linear_svd`` and ``dare_ties_svd`` (PEFT's non-SVD ``ties``/``dare_*``
prune the A and B factors separately, which peftkit does not do).

Only plain LoRA adapters (``lora``, ``qlora``) over linear layers and embeddings combine: DoRA's magnitudes, IA3's
scalings, bottleneck adapters and soft prompts add no low-rank weight delta. The sources must adapt the same
modules; adapters trained with ``bias`` or ``modules_to_save`` change base tensors that no delta describes and are
refused too. File-level checks (same base model) are in :func:`check_adapter_files`.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.adapter import adapter_parameters, get_state
from peftkit.core.files import refuse_overlap
from peftkit.errors import AdapterFileError, ConfigError

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
COMBINABLE_METHODS = ("lora", "qlora")
SignMethod = Literal["total", "frequency"]


# -- the public entry point --------------------------------------------------------------------------------------
def combine_adapters(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    combination: str,
    new_name: str,
    density: float | None = None,
    rank: int | None = None,
    majority_sign_method: SignMethod = "total",
    seed: int = 0,
) -> None:
    """Add LoRA adapter ``new_name`` to ``model``, combined from the loaded LoRA adapters ``adapters``.

    The new adapter is added inactive (as ``inject`` adds a second adapter): ``set_active(model, new_name)`` to use
    it, ``save_adapter(model, path, new_name)`` to write it. Nothing else on the model changes.

    Args:
        adapters: names of loaded plain LoRA adapters adapting the same modules.
        weights: one weight per adapter (any sign: a negative weight subtracts a task).
        combination: one of :data:`COMBINATIONS` (see the module docstring).
        new_name: name of the new adapter (must not exist).
        density: fraction of each delta kept, in (0, 1]; required by ties/dare/dare_ties, refused otherwise.
        rank: rank of the new adapter for svd/ties/dare/dare_ties, capped per module at min(out, in) (and for svd
            at the sum of source ranks, the exact sum's rank); default the largest source rank for svd, the sum of
            source ranks for the others. Refused for cat/linear.
        majority_sign_method: ``"total"`` (sign of the summed trimmed deltas) or ``"frequency"`` (majority of signs).
        seed: seeds DARE's random drop (the same seed gives the same adapter).

    Raises:
        ConfigError: a bad argument, an unknown or non-LoRA adapter, or sources adapting different modules.
    """
    _check_request(model, adapters, weights, combination, new_name, density, rank, majority_sign_method)
    targets = _check_sources(model, adapters)
    generator = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in targets:  # model order: DARE's random stream does not depend on how targets were listed
        layer = model.get_submodule(name)
        sources = [_source_factors(layer, a) for a in adapters]
        if combination in EXACT:
            factors[name] = exact_sum(sources, weights)
        elif combination == "svd":  # the SVD of the exact sum, from its factors: no dense (out, in) SVD
            k = rank or max(B.shape[1] for B, _, _ in sources)
            factors[name] = low_rank_of_product(*exact_sum(sources, weights), k)
        else:
            deltas = [s * B @ A for B, A, s in sources]  # each (out, in)
            delta = _dense_combination(combination, deltas, weights, density, majority_sign_method, generator)
            factors[name] = low_rank(delta, rank or sum(B.shape[1] for B, _, _ in sources))
    _add_combined(model, new_name, factors)


# -- argument and source checks ----------------------------------------------------------------------------------
def _check_request(model: nn.Module, adapters: list[str], weights: list[float], combination: str, new_name: str,
                   density: float | None, rank: int | None, sign_method: str) -> None:
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
    if combination in PRUNED:
        if density is None:
            raise ConfigError(f"combine: combination {combination!r} needs a density (fraction of each delta kept, "
                              "in (0, 1]; e.g. 0.2 for ties, 0.1-0.5 for dare)")
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ConfigError(f"combine: density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(f"combine: density applies to {', '.join(PRUNED)}, not to {combination!r}")
    if rank is not None:
        if combination in EXACT:
            raise ConfigError(f"combine: {combination!r} is exact (its rank is the sum of the sources' ranks); "
                              "rank applies to svd, ties, dare and dare_ties")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"combine: rank must be an integer >= 1, got {rank!r}")
    if sign_method not in ("total", "frequency"):
        raise ConfigError(f"combine: majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")


def _check_sources(model: nn.Module, adapters: list[str]) -> list[str]:
    """The modules every source adapts, in model order; ConfigError if a source cannot be combined."""
    from peftkit.methods.lora import LoraEmbedding, LoraLinear

    state = get_state(model)
    for a in adapters:
        config = state.configs[a]
        method = getattr(config, "method_name", type(config).__name__)
        if method not in COMBINABLE_METHODS:
            raise ConfigError(f"combine: adapter {a!r} is {method}: only plain LoRA adapters can be combined "
                              "(DoRA, IA3, bottleneck adapters and prompt methods add no low-rank weight delta)")
        if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
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
    order = [n for n, _ in model.named_modules() if n in first]
    for name in order:
        layer = model.get_submodule(name)
        for a in adapters:
            if not isinstance(layer, (LoraLinear, LoraEmbedding)) or a in getattr(layer, "lora_magnitude_vector", {}):
                raise ConfigError(f"combine: adapter {a!r} at module {name!r} ({type(layer).__name__}) is no plain "
                                  "LoRA linear/embedding adapter")
    return order


def _few(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# -- factor algebra ----------------------------------------------------------------------------------------------
def _source_factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, s)`` with delta = s·B·A in the layer's factor layout (out x in; embeddings dim x vocab), fp32."""
    if adapter in getattr(layer, "lora_A", {}):
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight  # (out, r), (r, in)
    else:
        B, A = layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]  # (dim, r), (r, vocab)
    return B.detach().float(), A.detach().float(), float(layer.scaling[adapter])


def exact_sum(sources: list[tuple[torch.Tensor, torch.Tensor, float]],
              weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Σ w_i·s_i·B_i·A_i by concatenation: B = [B_1 … B_n] (out, Σr), A = [w_i s_i A_i] (Σr, in)."""
    B = torch.cat([B for B, _, _ in sources], dim=1)  # (out, Σ r_i)
    A = torch.cat([w * s * A for (_, A, s), w in zip(sources, weights)], dim=0)  # (Σ r_i, in)
    return B, A


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``delta`` (out, in): B = U_k √S_k (out, k), A = √S_k V_kᵀ (k, in).

    ``rank`` is capped at min(out, in).
    """
    k = min(rank, *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in); m = min(out, in)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def low_rank_of_product(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`low_rank` of B·A (B (out, R), A (R, in)) without forming it: with B = Q_b R_b and Aᵀ = Q_a R_a,
    B·A = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small core gives B·A's (O((out + in)·R²) instead of a dense SVD)."""
    Qb, Rb = torch.linalg.qr(B)  # (out, m), (m, R); m = min(out, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (in, n), (n, R); n = min(in, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (m, n)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return (Qb @ U[:, :k]) * root, root[:, None] * (Vh[:k] @ Qa.T)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the rest (TIES' trim; density 1 keeps all)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1), k=k).indices] = True
    return delta * keep.view_as(delta)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale the kept ones by 1/density (density 1: as is)."""
    if density >= 1.0:
        return delta
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator).to(delta.device)
    return delta * keep / density


def ties_merge(deltas: list[torch.Tensor], weights: list[float], sign_method: SignMethod = "total") -> torch.Tensor:
    """Sign election and disjoint mean over (already trimmed or dropped) deltas.

    Each entry's sign is elected from the unweighted deltas (the sign of their sum, or of the count of positive
    minus negative entries); the result is the mean of the *weighted* entries that have that sign (entries equal
    to zero never count). As PEFT's ``ties``; with equal weights λ this is the paper's λ·τ_m.
    """
    stacked = torch.stack(deltas)  # (n, out, in)
    signs = stacked.sign()
    mass = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    elected = torch.where(mass >= 0, 1.0, -1.0)  # ties go to +
    agree = signs == elected  # (n, out, in)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
    total = (stacked * w * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def _dense_combination(combination: str, deltas: list[torch.Tensor], weights: list[float], density: float | None,
                       sign_method: SignMethod, generator: torch.Generator) -> torch.Tensor:
    """The combined dense delta (out, in) of the SVD-compressed combinations."""
    if combination == "svd":
        return sum(w * d for w, d in zip(weights, deltas))
    if combination == "ties":
        return ties_merge([magnitude_trim(d, density) for d in deltas], weights, sign_method)
    dropped = [random_drop(d, density, generator) for d in deltas]
    if combination == "dare":
        return sum(w * d for w, d in zip(weights, dropped))
    return ties_merge(dropped, weights, sign_method)  # dare_ties


# -- the new adapter ---------------------------------------------------------------------------------------------
def _add_combined(model: nn.Module, new_name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Attach LoRA adapter ``new_name`` on the modules of ``factors`` with delta = B·A at each (scaling 1)."""
    from peftkit.core.inject import inject
    from peftkit.methods.lora import LoraConfig

    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {name: k for name, k in ranks.items() if k != r}  # full module names: PEFT's pattern rule matches them
    config = LoraConfig(r=r, alpha=float(r), target_modules=list(factors), init="kaiming",
                        rank_pattern=other, alpha_pattern={name: float(k) for name, k in other.items()})
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    inject(model, config, new_name)  # re-marks trainable parameters: restored below
    for p in model.parameters():
        p.requires_grad_(trainable.get(id(p), False))
    with torch.no_grad():
        for name, (B, A) in factors.items():
            layer = model.get_submodule(name)
            s = layer.scaling[new_name]  # 1 by construction; divided out in case that ever changes
            if new_name in getattr(layer, "lora_A", {}):
                layer.lora_B[new_name].weight.copy_(B)
                layer.lora_A[new_name].weight.copy_(A / s)
            else:
                layer.lora_embedding_B[new_name].copy_(B)
                layer.lora_embedding_A[new_name].copy_(A / s)
    for _, p in adapter_parameters(model, new_name):
        p.requires_grad_(False)


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
        kind = _file_method(data)
        if kind != "lora":
            raise AdapterFileError(f"{path}: a {kind} adapter; only plain LoRA adapters can be combined (DoRA, IA3, "
                                   "bottleneck adapters and prompt methods add no low-rank weight delta)")
    records = [{**data, **{k: v for k, v in read_identity(path).items() if v is not None}}
               for path, data in zip(paths, configs)]
    for path, record in zip(paths[1:], records[1:]):
        _check_same_base(paths[0], records[0], path, record)
    return configs


def _file_method(data: dict[str, Any]) -> str:
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


def combine_to_folder(
    model_name: str,
    adapters: list[str | os.PathLike],
    out: str | os.PathLike,
    weights: list[float] | None = None,
    combination: str = "cat",
    density: float | None = None,
    rank: int | None = None,
    majority_sign_method: SignMethod = "total",
    seed: int = 0,
    into_base: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
    strict_base: bool = False,
) -> Path:
    """Combine adapter folders on base ``model_name`` and write the result to ``out`` atomically.

    Args:
        weights: one per adapter; default all 1 (the sum: what stacking the adapters gives).
        into_base: write a standalone model with the combined adapter merged (loads with transformers alone)
            instead of the combined adapter (a PEFT-format folder).
        dtype: parameter dtype of the standalone model (``into_base``).
        overwrite: replace a non-empty ``out``.
        strict_base: refuse an adapter recorded as trained on other base weights than ``model_name`` (default: warn).
        Others: as :func:`combine_adapters`.

    Raises:
        ConfigError: ``out`` exists and is not empty (without ``overwrite``), or a bad argument.
        AdapterFileError: a source folder cannot be combined (see :func:`check_adapter_files`).
    """
    from peftkit.core.adapter import set_active
    from peftkit.core.inject import unload
    from peftkit.core.io import save_adapter
    from peftkit.models import load_model
    from peftkit.models.export import DTYPES, save_model_folder

    out = Path(out)
    for adapter in adapters:
        refuse_overlap(out, {"--adapter": adapter})
    if Path(model_name).is_dir():
        refuse_overlap(out, {"--model": model_name})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    check_options(len(adapters), weights, combination, density, rank, majority_sign_method)
    check_adapter_files(adapters)  # before loading the base: fail fast
    model, tok = load_model(model_name)
    names = load_sources(model, adapters, strict_base)
    new_name = "combined"
    while new_name in names:
        new_name += "_"
    combine_adapters(model, names, weights, combination, new_name, density, rank, majority_sign_method, seed)
    if not into_base:
        return save_adapter(model, out, new_name)
    set_active(model, new_name)
    return save_model_folder(unload(model, merge=True).to(DTYPES[dtype]), tok, out)
