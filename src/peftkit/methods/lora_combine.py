r"""The LoRA algebra of combining adapters into a new one: task arithmetic, concatenation, SVD, TIES and DARE.

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
refused too (``LoraConfig.combinable``; the checks that do not depend on the method, and the file-level ones,
are :mod:`peftkit.core.combine`'s; writing the result to a folder is :mod:`peftkit.runs.combine`'s).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from peftkit.core.adapter import adapter_parameters
from peftkit.core.combine import EXACT, SignMethod, check_request, check_sources
from peftkit.core.inject import inject
from peftkit.errors import ConfigError
from peftkit.methods.lora import LoraConfig, LoraEmbedding, LoraLinear


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
    check_request(model, adapters, weights, combination, new_name, density, rank, majority_sign_method)
    targets = _check_layers(model, check_sources(model, adapters), adapters)
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


def _check_layers(model: nn.Module, order: list[str], adapters: list[str]) -> list[str]:
    """``order``, once every source is a plain LoRA linear/embedding adapter at each of its modules."""
    for name in order:
        layer = model.get_submodule(name)
        for a in adapters:
            if not isinstance(layer, (LoraLinear, LoraEmbedding)) or a in getattr(layer, "lora_magnitude_vector", {}):
                raise ConfigError(f"combine: adapter {a!r} at module {name!r} ({type(layer).__name__}) is no plain "
                                  "LoRA linear/embedding adapter")
    return order


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


__all__ = ["combine_adapters", "exact_sum", "low_rank", "low_rank_of_product", "magnitude_trim", "random_drop",
           "ties_merge"]
