"""Run a causal LM's output head only at the positions the loss reads.

With response-only loss most positions carry no label (a rotten-tomatoes example: ~3 labelled of ~70), yet a
plain forward multiplies every position's hidden state by the vocabulary matrix (SmolLM2: 576 x 49,152, a
fifth of the model's matmul work) and keeps those fp32 logits, (B, T, V), for the backward pass.

:func:`head_positions` selects, just before the head runs, the hidden states of each row's labelled positions
(a forward pre-hook on ``get_output_embeddings()``), so the model returns logits for those positions only,
(B, K, V) with K the most labels in a row. Whatever the model does after its head (soft-capping, scaling) still applies, and nothing
is re-implemented per architecture. The loss is the same sum over the same terms.

The hook leaves the call alone when it cannot tell what it sees (no output embedding, a head input that is
not (B, >= T, d)); the caller then gets full logits and knows from their shape. A method that prepends
positions (soft prompts) hands the head (B, N + T, d): the caller's tokens are the last T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from peftkit.data.tokenize import IGNORE


def labelled_positions(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's labelled positions, packed to the left: ``(index, target)``, both (B, K).

    ``target`` is the shifted labels (B, T-1); K is the most labels any row has. Rows with fewer are
    filled with position 0 and target ``IGNORE``, so the loss over the selection is the loss over ``target``.
    """
    labelled = target != IGNORE  # (B, T-1)
    k = int(labelled.sum(dim=1).max()) if labelled.numel() else 0
    index = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :k]  # labelled first, in order
    picked = target.gather(1, index)  # (B, K); fillers are unlabelled positions, so IGNORE already
    return index, picked


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to logits, through DDP/FSDP wrappers; None if unknown."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def head_positions(model: nn.Module, index: torch.Tensor, seq_len: int) -> Iterator[list[bool]]:
    """Within the block, the model's head sees only the positions ``index`` of the caller's ``seq_len`` tokens.

    Args:
        index: (B, K) positions per row (from :func:`labelled_positions`), or (K,) the same for every row.

    Yields a one-element list that tells, after the forward, whether the selection was applied (False: the
    logits are the full (B, T, V) ones). Only the head's first call is changed.
    """
    applied = [False]
    head = output_head(model)
    if head is None:
        yield applied
        return
    calls = [0]

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        calls[0] += 1
        if calls[0] > 1 or not args or not isinstance(args[0], torch.Tensor):
            return None
        hidden = args[0]  # (B, T', d), T' >= T
        if hidden.ndim != 3 or hidden.shape[1] < seq_len or (index.ndim == 2 and index.shape[0] != hidden.shape[0]):
            return None
        offset = hidden.shape[1] - seq_len  # positions a method prepended (soft prompts)
        applied[0] = True
        if index.ndim == 1:
            return (hidden.index_select(1, index + offset), *args[1:])  # (B, K, d)
        rows = (index + offset).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, K, d)
        return (hidden.gather(1, rows), *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield applied
    finally:
        handle.remove()
