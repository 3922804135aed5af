"""Run the prompt prefix that every row of a batch shares once, not once per row.

Chat templates open every example with the same tokens (SmolLM2's default system prompt: ~20 tokens) and
instruction data repeat their instruction: in a rotten-tomatoes batch ~36 of each row's ~72 tokens are the
same in every row. In a causal model a position's states depend only on the positions before it, so those
states are identical across rows. :func:`shared_prefix_logits` runs the prefix once (batch 1, building a KV
cache), repeats its keys/values over the batch (``Cache.batch_repeat_interleave``, differentiable) and runs
each row's remainder against them. Backward sums every row's gradient into the one prefix computation:
the same loss and gradients as the plain forward, with the prefix's work done once.

It applies only where that is the plain computation (:func:`can_share`): a plain model call, not
distributed (DDP's reducer and FSDP's resharding expect one forward per backward), no gradient checkpointing (its recomputation
would append to the cache twice), no per-row adapters (``core.mixed``), no active dropout (rows would
share one mask on the prefix), and only ``input_ids``/``attention_mask`` inputs. The first time a model
uses it, the loss on two rows of the batch is compared with the plain forward's (no gradients); a model where
they differ (a method that does something with the sequence this cannot follow) keeps the plain forward
from then on, with a warning.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from peftkit.data.tokenize import IGNORE
from peftkit.train.lm_head import HeadCapture, head_positions

MIN_PREFIX = 8  # shorter shared prefixes are not worth a second model call
_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def shared_prefix_len(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row shares (unpadded, and with no label at or right after them), else 0.

    The prefix ends before the first labelled position's predecessor, so no logit of the prefix is needed;
    at least one position of every row is left after it.
    """
    ids, labels = batch["input_ids"], batch["labels"]  # (B, T)
    if ids.ndim != 2 or ids.shape[0] < 2 or set(batch) - {"input_ids", "attention_mask", "labels"}:
        return 0
    same = (ids == ids[:1]).all(dim=0)  # (T,)
    if "attention_mask" in batch:
        same &= (batch["attention_mask"] == 1).all(dim=0)
    n = int(same.long().cumprod(0).sum())
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    if labelled.numel():
        n = min(n, int(labelled[0]) - 1)  # label at t is predicted from t-1: both stay out of the prefix
    n = min(n, ids.shape[1] - 1)
    return n if n >= MIN_PREFIX else 0


def can_share(model: nn.Module) -> bool:
    """Whether the shared-prefix forward is the plain computation for this model (see the module doc)."""
    if hasattr(model, "module") or not hasattr(model, "get_output_embeddings"):
        return False  # DDP/FSDP wrapper, or not a transformers model
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False  # FSDP2 shards in place (no wrapper): its reshard-after-forward expects one forward per backward
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, name, False):  # transformers >= 5 name first (the old one warns)
        return False
    for m in model.modules():
        if getattr(m, "mixed_rows", None) is not None:
            return False
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
    config = getattr(model, "config", None)
    if model.training and any(getattr(config, k, 0) or 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
        return False
    return getattr(config, "is_encoder_decoder", False) is False


def shared_prefix_logits(model: nn.Module, inputs: dict[str, torch.Tensor], prefix: int, keep: torch.Tensor,
                         capture: HeadCapture | None = None) -> tuple[torch.Tensor, bool]:
    """Logits of the positions after ``prefix`` (the prefix run once for the whole batch).

    Args:
        inputs: ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T).
        prefix: P, from :func:`shared_prefix_len`.
        keep: (B, K) positions per row (of the whole sequence, all >= P) whose logits are wanted.
        capture: passed to :func:`~peftkit.train.lm_head.head_positions` for the positions after the prefix.

    Returns:
        ``(logits, selected)``: (B, K, V) for ``keep`` when ``selected``, else (B, T - P, V).
    """
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    batch, seq = ids.shape
    nothing = torch.empty(0, dtype=torch.long, device=ids.device)
    with head_positions(model, nothing, prefix):  # the head has no work on the prefix
        out = model(input_ids=ids[:1, :prefix], attention_mask=None if mask is None else mask[:1, :prefix], use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(batch)  # (1, H, P, D) -> (B, H, P, D) in every layer
    positions = torch.arange(prefix, seq, device=ids.device).expand(batch, -1)  # (B, T - P)
    with head_positions(model, keep - prefix, seq - prefix, capture) as applied:
        out = model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
    logits = out.logits
    return logits, applied[0] and logits.shape[1] == keep.shape[-1]


def was_shared(model: nn.Module) -> bool:
    """Whether ``model`` has run shared-prefix forwards (its first-use check passed): the memory prediction's
    batch shape counts the prefix once per batch only then."""
    return bool(_CHECKED.get(model))


def checked(model: nn.Module, plain_loss: Callable[[], tuple[torch.Tensor, int]],
            shared_loss: Callable[[], tuple[torch.Tensor, int]],
            memo: weakref.WeakKeyDictionary[nn.Module, bool] = _CHECKED) -> bool:
    """First use on ``model``: compare the shared-prefix loss with the plain one (no gradients); remembered in
    ``memo`` (one per lever).

    Both callables return ``(summed loss, label count)`` on the same (small) batch.
    """
    ok = memo.get(model)
    if ok is not None:
        return ok
    with torch.no_grad():
        a, n = plain_loss()
        b, _ = shared_loss()
    if n == 0:
        return False  # nothing to compare on yet: plain forward this time, check again on the next batch
    a, b = float(a) / n, float(b) / n
    low_precision = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))  # bf16 rounds batch-1 vs batch-2 apart
    tol = 2e-2 if low_precision else 1e-3
    ok = math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=tol, abs_tol=tol / 10)
    if not ok:
        warnings.warn(f"shared-prefix forward gave loss {b:.6g} vs {a:.6g} for the plain forward on "
                      f"{type(model).__name__}: using the plain forward", stacklevel=3)
    memo[model] = ok
    return ok
