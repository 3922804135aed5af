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
    return batches_from_order(order, lengths, batch_size, rng, group_by_length, token_budget)


def accumulated_batches(
    lengths: Sequence[int],
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """The micro-batches of one epoch when ``grad_accum`` of them make an optimizer step (padded batches).

    The epoch is ordered as the batches of one step (``batch_size`` x ``grad_accum``, length-grouped like any
    batch), each cut into ``grad_accum`` micro-batches, so a step trains on the examples the larger batch would;
    a short last step is padded with empty micro-batches (skipped) so that every step starts at a multiple of
    ``grad_accum``. With ``grad_accum`` 1 this is :func:`batch_order`.
    """
    if grad_accum == 1:
        return batch_order(lengths, batch_size, seed, epoch, group_by_length)
    steps = batch_order(lengths, batch_size * grad_accum, seed, epoch, group_by_length)
    micro = [[step[s:s + batch_size] for s in range(0, len(step), batch_size)] for step in steps]
    return [b for m in micro for b in m + [[]] * (grad_accum - len(m))]


def batches_from_order(
    order: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
    rng: random.Random,
    group_by_length: bool = True,
    token_budget: int | None = None,
) -> list[list[int]]:
    """Cut an already shuffled ``order`` of example indices into batches (see :func:`batch_order`);
    ``rng`` shuffles the batches when they are grouped by length."""
    order = list(order)
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


CALL_OVERHEAD = 32  # what one more forward/backward call costs, in padded tokens (python, small matmuls)


def split_padded(batch: dict[str, torch.Tensor], overhead: int = CALL_OVERHEAD) -> list[dict[str, torch.Tensor]]:
    """A right-padded batch as sub-batches of similar-length rows, each cut to its own longest row.

    One long example makes every row of its batch as long as itself (chatterbot: a 221-token answer among
    rows of ~60). Regrouping the rows so that ``sum(rows x longest)`` is least (plus ``overhead`` per extra
    call, and minus what a token prefix shared by all rows saves when run once per sub-batch, see
    ``train/shared_prefix.py``) drops that padding; the loop sums the sub-batches' losses and gradients
    over the step, which is the batch's own. Rows keep their order within a sub-batch.

    Returns ``[batch]`` when nothing is gained or the batch is not a right-padded (B, T) one.
    """
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if ids is None or mask is None or ids.ndim != 2 or ids.shape[0] < 2:
        return [batch]
    rows, width = ids.shape
    lengths = mask.sum(dim=1)  # (B,)
    if not torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths[:, None]):
        return [batch]  # not right-padded: rows cannot be cut at their length
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)  # (T,)
    groups = padding_groups(lengths.tolist(), int(same.long().cumprod(0).sum()), overhead)
    if len(groups) == 1:
        return [batch]
    out = []
    for group in groups:
        keep = torch.tensor(group, device=ids.device)
        cut = int(lengths[keep].max())
        sub = {}
        for key, value in batch.items():
            if value.ndim >= 2 and value.shape[:2] == (rows, width):
                if key not in _ALIGNED or (key == "labels" and (value[keep, cut:] != IGNORE).any()):
                    return [batch]  # a (B, T) tensor not known to follow input_ids (seq2seq labels): leave it whole
                sub[key] = value[keep, :cut]
            elif value.ndim >= 1 and value.shape[0] == rows:
                sub[key] = value[keep]
            else:
                return [batch]
        out.append(sub)
    return out


_ALIGNED = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")  # per-token, as input_ids


def padding_groups(lengths: Sequence[int], shared: int = 0, overhead: int = CALL_OVERHEAD) -> list[list[int]]:
    """How :func:`split_padded` groups rows of these ``lengths`` (whose first ``shared`` tokens are the same in
    every row): row indices of each sub-batch, ascending; one group when splitting gains nothing."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    runs = _least_padding([lengths[i] for i in order], shared, overhead)
    return [sorted(order[start:stop]) for start, stop in runs]


def _least_padding(lengths: Sequence[int], shared: int, overhead: int) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into runs ``[start, stop)`` minimising the padded tokens computed."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] - (j - i - 1) * shared + (overhead if i else 0)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]
