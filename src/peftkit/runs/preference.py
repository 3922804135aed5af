"""A preference run (DPO, IPO, hinge, ORPO, SimPO) around the method-agnostic loop: which objective, where the
reference log-probabilities come from, and the pairs encoded with the run's template.

The reference costs no second copy of the weights: for a method that leaves the base tensors alone it is the
same model with its adapters switched off (one no-gradient forward per step, :func:`peftkit.disable_adapters`);
for a method that changes base tensors (full, selective, BitFit, linear probe), a run that starts from an
adapter (``init_adapter``: the reference is that adapter, frozen, as TRL does it) or with
``train.precompute_reference``, the log-probabilities are computed once before training, with the model as it
starts, and kept with the tokenized pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.data.preference import encode_pair, has_labels
from peftkit.data.template import Template
from peftkit.data.tokenize import Encoded
from peftkit.errors import ConfigError
from peftkit.runs.config import RunConfig
from peftkit.train.loss import Objective
from peftkit.train.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    PreferenceLoss,
    pair_collate,
    pair_count,
    pair_logps,
)


def objective_name(cfg: RunConfig, data_format: str) -> str:
    """``sft`` or a preference loss: ``train.objective``, with ``auto`` following the data.

    Raises:
        ConfigError: a preference objective without preference data, or ``sft`` on pairs.
    """
    name = cfg.train.objective
    pairs = data_format == "preference"
    if name == "auto":
        return "dpo" if pairs else "sft"
    if name in PREFERENCE_LOSSES and not pairs:
        raise ConfigError(f"train.objective={name} trains on preference pairs (prompt, chosen, rejected); the data is "
                          f"{data_format}")
    if name == "sft" and pairs:
        raise ConfigError("train.objective=sft on preference data: use dpo, ipo, hinge, orpo or simpo (or train on "
                          "the chosen answers as prompt/completion data)")
    return name


def encode_pairs(template: Template, rows: list[dict[str, Any]], max_length: int) -> Encoded:
    out = Encoded()
    for row in rows:
        enc, truncated = encode_pair(template, row, max_length)
        out.truncated += truncated
        if has_labels(enc):
            out.examples.append(enc)
        else:
            out.dropped += 1
    return out


def needs_precompute(cfg: RunConfig) -> bool:
    """Whether the reference is computed once before training (module docstring)."""
    t = cfg.train
    return t.precompute_reference or cfg.method.trains_base_tensors() or bool(cfg.init_adapter)


def preference_objective(cfg: RunConfig, name: str) -> tuple[Objective, PreferenceLoss]:
    """The loop's objective for preference loss ``name``; the reference is the model with its adapters off unless
    the examples carry precomputed log-probabilities (:func:`precompute_reference`)."""
    t = cfg.train
    loss = PreferenceLoss(name, t.beta, t.label_smoothing, t.simpo_gamma, reference=adapters_off_logps)
    return Objective(loss, pair_count, pair_collate, loss.metrics), loss


def adapters_off_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from peftkit.core.adapter import disable_adapters

    with disable_adapters(model):
        return pair_logps(model, batch)[0]


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> None:
    """Store ``ref_chosen`` / ``ref_rejected`` (summed log-probabilities under ``model`` as it is now) in each
    example, in eval mode (no dropout)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(examples), batch_size):
            part = examples[s:s + batch_size]
            batch = {k: v.to(device) for k, v in pair_collate(part, pad_id).items()}
            logps = pair_logps(model, batch)[0].double().cpu()
            for i, e in enumerate(part):
                e["ref_chosen"], e["ref_rejected"] = float(logps[i]), float(logps[len(part) + i])
    finally:
        model.train(was)


__all__ = ["REFERENCE_FREE", "encode_pairs", "needs_precompute", "objective_name", "precompute_reference",
           "preference_objective"]
