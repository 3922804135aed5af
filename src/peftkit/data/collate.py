"""Batches: dynamic padding, length-grouped order, and packing without cross-example attention."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from peftkit.data.tokenize import IGNORE

Example = dict[str, list[int]]


def pad_batch(examples: Sequence[Example], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch (not to a fixed length)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(e["input_ids"])
        labels[i, cols] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row; ``position_ids`` restart at 0 for each example.

    transformers (>= 4.50) reads restarting position ids with no attention mask (and no KV cache:
    call the model with ``use_cache=False``) as packed sequences and
    builds a block-diagonal causal mask, so no token attends to another example. Labels of each
    example's first token are not predicted from the previous example (the shift crosses a boundary).
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        lab = list(e.get("labels", e["input_ids"]))
        lab[0] = IGNORE  # predicted from the previous example's last token otherwise
        labels += lab
        pos += list(range(n))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
    }


def batch_order(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    token_budget: int | None = None,
) -> list[list[int]]:
    """Indices of each batch for one epoch, deterministic in (seed, epoch).

    Shuffled; with ``group_by_length`` examples of similar length share a batch (sorted inside chunks of
    50 batches, then the batches are shuffled), which cuts padding. With ``token_budget`` (packing) a
    batch is a run of examples whose lengths sum to at most the budget.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if token_budget is not None:
        batches, cur, used = [], [], 0
        for i in order:
            if cur and used + lengths[i] > token_budget:
                batches.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += lengths[i]
        return batches + ([cur] if cur else [])
    if group_by_length:
        chunk = batch_size * 50
        order = [i for s in range(0, len(order), chunk) for i in sorted(order[s:s + chunk], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches
