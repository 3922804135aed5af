"""Preference objectives: learn from pairs (a chosen and a rejected answer to one prompt) instead of targets.

With π the policy (the model being trained) and π_ref the reference, the log-probabilities of an answer y given
the prompt x summed over its tokens (``logps``), and Δ = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)]:

* ``dpo`` (Rafailov et al. 2023, arXiv:2305.18290): −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) (ε: ``label_smoothing``,
  the conservative DPO of Mitchell 2023; 0 is plain DPO);
* ``ipo`` (Azar et al. 2023, arXiv:2310.12036): (Δ̄ − 1/(2β))², Δ̄ with each log-ratio divided by its answer's
  token count (as TRL computes it);
* ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 − βΔ);
* ``orpo`` (Hong et al. 2024, arXiv:2403.07691), reference-free: NLL(y_c) − β·log σ(log odds(y_c) − log odds(y_r)),
  with mean per-token log-probabilities p̄ and odds = p̄/(1−p̄);
* ``simpo`` (Meng et al. 2024, arXiv:2405.14734), reference-free: −log σ(β·(p̄_c − p̄_r) − γ).

The reference is the caller's (:class:`PreferenceLoss`): log-probabilities precomputed into the batch
(``ref_logps``), or a function of (model, batch), e.g. the same model with its adapters switched off. The loop
knows none of this: it calls the objective as it calls next-token prediction.

Logged as TRL logs them: ``rewards/chosen`` and ``rewards/rejected`` (β × the log-ratio; for the reference-free
losses β × p̄), ``rewards/margins``, ``rewards/accuracies`` (the share of pairs ranked right), ``logps/chosen``,
``logps/rejected``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.labels import IGNORE
from peftkit.data.collate import Example, pad_batch

PreferenceLossName = Literal["dpo", "ipo", "hinge", "orpo", "simpo"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLossName)
REFERENCE_FREE = ("orpo", "simpo")
Reference = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def pair_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows, the B chosen sequences then the B rejected ones; ``pairs`` (B, 2)
    row indices (it also keeps the loop from splitting the batch apart); ``ref_logps`` (2B,) when the examples
    carry precomputed reference log-probabilities."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    rows += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    batch = pad_batch(rows, pad_id)
    b = len(examples)
    batch["pairs"] = torch.stack([torch.arange(b), torch.arange(b, 2 * b)], dim=1)
    if all("ref_chosen" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_chosen"] for e in examples] + [e["ref_rejected"] for e in examples],
                                          dtype=torch.float64)
    return batch


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["pairs"].shape[0])


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probabilities of each row's labelled tokens (2B,), labelled token counts (2B,))``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, -batch["input_ids"].shape[1]:]  # soft prompts prepend virtual positions
    target = batch["labels"][:, 1:]  # (2B, T-1): token t is predicted at t-1
    mask = target != IGNORE
    logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (N, V): labelled positions only
    picked = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    rows = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    rows[mask] = picked
    return rows.sum(dim=1), mask.sum(dim=1)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps`, with each pair's prompt run once where that is the same computation
    (:mod:`peftkit.train.pair_prompt`)."""
    from peftkit.train.pair_prompt import applies, pair_prompt_logps

    if applies(model, batch):
        return pair_prompt_logps(model, batch)
    return sequence_logps(model, batch)


@dataclass
class PreferenceLoss:
    """The objective's loss function (``(model, batch) -> (summed loss over pairs, pairs)``), its settings, and the
    metrics of the pairs it has seen since :meth:`metrics` was last called.

    Attributes:
        loss: which objective (module docstring).
        beta: β (DPO's temperature; ORPO's weight of the odds-ratio term).
        label_smoothing: ε of conservative DPO (``dpo`` only).
        gamma: SimPO's target margin γ.
        reference: ``(model, batch) -> reference log-probabilities (2B,)`` when the batch carries none
            (not used by the reference-free losses).
    """

    loss: PreferenceLossName = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    reference: Reference | None = None
    _sums: dict[str, float] = field(default_factory=dict, repr=False)
    _pairs: int = field(default=0, repr=False)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        # the reference first: its no-grad forward's logits are freed before the policy's activations exist
        ref = self._reference(model, batch)
        logps, counts = pair_logps(model, batch)
        b = pair_count(batch)
        per_pair, rewards = self.pair_losses(logps, counts, ref, batch)
        if model.training:  # validation batches are not the training metrics
            self._record(logps.detach(), rewards, b)
        return per_pair.sum(), b

    def _reference(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.loss in REFERENCE_FREE:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.reference is None:
            raise ValueError(f"{self.loss} needs reference log-probabilities: none precomputed, no reference given")
        with torch.no_grad():
            return self.reference(model, batch).detach()

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None,
                    batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Per-pair losses (B,) and the (chosen, rejected) rewards (B,) each, from the rows' summed log-probs."""
        b = logps.shape[0] // 2
        mean = logps / counts.clamp(min=1)
        if self.loss in REFERENCE_FREE:
            c, r = mean[:b], mean[b:]
            rewards = (self.beta * c.detach(), self.beta * r.detach())
            if self.loss == "simpo":
                return -F.logsigmoid(self.beta * (c - r) - self.gamma), rewards
            log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
            nll = -logps[:b] / counts[:b].clamp(min=1)
            return nll - self.beta * F.logsigmoid(log_odds), rewards
        ratio = logps - ref.to(logps.dtype)  # (2B,) log π − log π_ref
        rewards = (self.beta * ratio[:b].detach(), self.beta * ratio[b:].detach())
        if self.loss == "ipo":
            avg = ratio / counts.clamp(min=1)
            return (avg[:b] - avg[b:] - 1 / (2 * self.beta)) ** 2, rewards
        delta = ratio[:b] - ratio[b:]
        if self.loss == "hinge":
            return torch.relu(1 - self.beta * delta), rewards
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * delta) - eps * F.logsigmoid(-self.beta * delta), rewards

    def _record(self, logps: torch.Tensor, rewards: tuple[torch.Tensor, torch.Tensor], b: int) -> None:
        chosen, rejected = rewards
        values = {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                  "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": (chosen > rejected).float().sum(),
                  "logps/chosen": logps[:b].sum(), "logps/rejected": logps[b:].sum()}
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._pairs += b

    def metrics(self) -> dict[str, float]:
        """Means over the pairs seen since the last call (then forgotten)."""
        out = {k: v / self._pairs for k, v in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = {}, 0
        return out


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
