"""Run each preference pair's prompt once: chosen and rejected continue the same prompt states.

A preference batch holds 2B rows: the B prompts + chosen answers, then the same B prompts + rejected answers
(:func:`peftkit.train.preference.pair_collate`). In a causal model the prompt's states do not depend on the answer
after it, so the plain forward computes every prompt twice. Here the B prompts run once (right-padded, building a KV
cache), the cache is repeated for the two answers of each pair (``Cache.batch_repeat_interleave``, differentiable:
backward sums both answers' gradients into the one prompt computation), and the 2B answers run against it with
position ids that continue each prompt and an attention mask that hides the prompts' padding. Same log-probabilities
and gradients as the plain forward; the prompts' work and activations once per pair instead of twice. For SmolLM2's
chat template on the built-in pairs the prompt (~40 tokens with the default system prompt) is longer than the answers.

It applies where :mod:`peftkit.train.shared_prefix` does (:func:`~peftkit.train.shared_prefix.can_share`: a plain
model call, no gradient checkpointing, no per-row adapters, no active dropout), to pairs whose shared prompt is at
least ``MIN_PREFIX`` tokens, and after the same first-use check (the log-probabilities of the first batch compared
with the plain forward's, no gradients; a model where they differ, e.g. a soft prompt or prefix tuning, keeps the
plain forward).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from peftkit.core.labels import IGNORE
from peftkit.train.shared_prefix import MIN_PREFIX, can_share, checked

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def pair_prompt_lens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) leading tokens the chosen and rejected rows of each pair share, ending before the predecessor of the
    pair's first labelled position (no logit of the prompt part is needed); 0 for a pair with padding there."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    b = ids.shape[0] // 2
    same = (ids[:b] == ids[b:]) & (mask[:b] == 1) & (mask[b:] == 1)  # (B, T)
    n = same.long().cumprod(dim=1).sum(dim=1)
    labelled = (labels[:b] != IGNORE) | (labels[b:] != IGNORE)
    first = torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), torch.full_like(n, ids.shape[1]))
    return torch.minimum(n, first - 1).clamp(min=0)


def applies(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the pair-prompt forward is used for ``batch`` (first use on a model: checked against the plain one)."""
    from peftkit.train.preference import sequence_logps

    if set(batch) - {"input_ids", "attention_mask", "labels", "pairs", "ref_logps"} or not can_share(model):
        return False
    if int(pair_prompt_lens(batch).min()) < MIN_PREFIX:
        return False
    return checked(model, lambda: _as_loss(*sequence_logps(model, batch)),
                   lambda: _as_loss(*pair_prompt_logps(model, batch)), memo=_CHECKED)


def was_shared(model: nn.Module) -> bool:
    """Whether ``model`` has run pair-prompt forwards (its first-use check passed)."""
    return bool(_CHECKED.get(model))


def _as_loss(logps: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    return -logps.sum(), int(counts.sum())


def pair_prompt_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probabilities of each row's labelled tokens (2B,), labelled token counts (2B,))``, each pair's
    prompt run once (module docstring)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, seq = ids.shape
    b = rows // 2
    lens = pair_prompt_lens(batch)  # (B,)
    width = int(lens.max())
    ar = torch.arange(width, device=ids.device)
    prompt_mask = (ar[None, :] < lens[:, None]).long()  # (B, P): right padding after each prompt
    prompt_ids = torch.where(prompt_mask.bool(), ids[:b, :width], torch.zeros_like(ids[:b, :width]))
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # (B, ...) -> (2B, ...) as c0, r0, c1, r1, ...
    order = torch.stack([torch.arange(b), torch.arange(b, rows)], dim=1).reshape(-1).to(ids.device)  # c0, r0, ...
    start = lens.repeat_interleave(2)  # (2B,) where each row's own part begins
    rest = seq - int(start.min())
    take = (start[:, None] + torch.arange(rest, device=ids.device)[None, :]).clamp(max=seq - 1)  # (2B, R)
    valid = (start[:, None] + torch.arange(rest, device=ids.device)[None, :]) < seq
    row_ids = ids[order].gather(1, take) * valid
    row_mask = mask[order].gather(1, take) * valid
    row_labels = torch.where(valid, labels[order].gather(1, take), torch.full_like(take, IGNORE))
    full_mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), row_mask], dim=1)  # (2B, P + R)
    positions = take  # each row continues its own prompt: position = index in the original sequence
    logits = model(input_ids=row_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                   use_cache=False).logits  # (2B, R, V)
    target = row_labels[:, 1:]  # token j+1 of the row's part is predicted at j
    keep = target != IGNORE
    logp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)  # (N, V): labelled positions only
    picked = logp.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
    per_row = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device)
    per_row[keep] = picked
    sums, counts = per_row.sum(dim=1), keep.sum(dim=1)
    back = torch.empty_like(order)
    back[order] = torch.arange(rows, device=ids.device)
    return sums[back], counts[back]  # back in chosen-then-rejected order
