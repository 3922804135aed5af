"""Preference accuracy: how often the model ranks the chosen answer of a pair above the rejected one, by the
summed log-probability of each answer after the prompt (rendered with the template training used)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.data.preference import encode_pair, has_labels
from peftkit.data.template import Template


@torch.no_grad()
def preference_accuracy(model: nn.Module, template: Template, rows: list[dict[str, Any]], max_length: int = 512,
                        batch_size: int = 8) -> dict[str, Any]:
    """``{"n", "preference_accuracy", "mean_margin"}`` over ``rows`` (normalized pairs, ``data.preference``);
    the margin is log p(chosen) − log p(rejected), averaged. Ties count as wrong."""
    from peftkit.train.preference import pair_collate, pair_logps

    pad = template.tokenizer.pad_token_id if template.tokenizer.pad_token_id is not None else \
        template.tokenizer.eos_token_id
    examples = [e for e in (encode_pair(template, r, max_length)[0] for r in rows) if has_labels(e)]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    try:
        for s in range(0, len(examples), batch_size):
            part = examples[s:s + batch_size]
            batch = {k: v.to(device) for k, v in pair_collate(part, pad).items()}
            logps = pair_logps(model, batch)[0]
            margins += (logps[: len(part)] - logps[len(part):]).tolist()
    finally:
        model.train(was)
    n = len(margins)
    return {"n": n, "preference_accuracy": sum(m > 0 for m in margins) / max(n, 1),
            "mean_margin": sum(margins) / max(n, 1)}
