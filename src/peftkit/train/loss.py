"""Objectives: the summed loss and label count of a batch for each task type (next-token, classification head,
encoder-decoder), and the loss over a held-out set. The loop calls an :class:`Objective` and knows nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.data.collate import Example, pad_batch
from peftkit.data.tokenize import IGNORE
from peftkit.train.config import TrainConfig
from peftkit.train.distributed import SINGLE, Dist, local_slice
from peftkit.train.lm_head import HeadCapture, head_positions, labelled_positions
from peftkit.train.precision import autocast, model_device
from peftkit.train.shared_prefix import can_share, checked, shared_prefix_len, shared_prefix_logits


@dataclass(frozen=True)
class LossPath:
    """How one batch's next-token loss is computed. Every path gives the same sum (to float rounding); they
    differ in the work done and the memory held.

    Attributes:
        prefix: leading tokens every row shares, run once for the batch (:mod:`peftkit.train.shared_prefix`);
            0: one plain forward over the batch. Only with ``labelled_only``.
        labelled_only: the LM head runs only at each row's labelled positions (:mod:`peftkit.train.lm_head`);
            False: full (B, T, V) logits.
        fused: head and cross-entropy by chunks, without (N, V) logits (:class:`~peftkit.train.lm_head.HeadCapture`),
            where the model's head allows it. Only with ``labelled_only``.
    """

    prefix: int = 0
    labelled_only: bool = True
    fused: bool = True


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = True,
                share_prefix: bool = True, fused_loss: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    The path is chosen once (:func:`choose_path`), then computed (:func:`path_loss`).

    Args:
        labelled_only: run the LM head only at each row's labelled positions (see
            :mod:`peftkit.train.lm_head`): the same loss, without the head's work and fp32 logits elsewhere.
        share_prefix: run the leading tokens every row shares once for the batch (see
            :mod:`peftkit.train.shared_prefix`): the same loss, checked once per model.
        fused_loss: with ``labelled_only``, run the head and the cross-entropy together by chunks of positions,
            gradients made in the same pass (:func:`peftkit.train.lm_head.linear_cross_entropy_sum`): the same
            loss without (N, V) logits, where the head is a plain ``nn.Linear`` whose output the model returns
            and the run is not distributed (elsewhere, e.g. an adapted or quantized head, the plain loss;
            ``train.fused_loss=false`` turns it off).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from position t-1
    n = int((target != IGNORE).sum())
    path = choose_path(model, batch, labelled_only, share_prefix, fused_loss)
    return path_loss(model, inputs, target, path), n


def choose_path(model: nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = True,
                share_prefix: bool = True, fused_loss: bool = True) -> LossPath:
    """The path for ``batch``: the options asked for, with the shared prefix only where the batch has one and
    ``model`` computes it as the plain forward would (:func:`~peftkit.train.shared_prefix.can_share`, and the
    first-use check on two rows of the batch: :func:`~peftkit.train.shared_prefix.checked`)."""
    fused = fused_loss and labelled_only
    prefix = shared_prefix_len(batch) if share_prefix and labelled_only else 0
    if prefix and can_share(model):
        target = batch["labels"][:, 1:]  # (B, T-1)
        # the first-use check runs on the two rows with the most labels: cheap, and still a shared prefix
        rows = (target != IGNORE).sum(dim=1).topk(2).indices.sort().values
        two = {k: v[rows] for k, v in batch.items() if k != "labels"}
        two_target = target[rows]
        n_two = int((two_target != IGNORE).sum())
        if checked(model, lambda: (path_loss(model, two, two_target, LossPath(0, True, fused)), n_two),
                   lambda: (path_loss(model, two, two_target, LossPath(prefix, True, fused)), n_two)):
            return LossPath(prefix, True, fused)
    return LossPath(0, labelled_only, fused)


def path_loss(model: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor,
              path: LossPath) -> torch.Tensor:
    """The summed loss of ``inputs`` against ``target`` (B, T-1) along ``path``.

    A forward can show that the model does not follow the path (its head's output is not what it returns as
    logits, found on first use and remembered by :class:`~peftkit.train.lm_head.HeadCapture`; or logits whose
    positions the selection cannot follow): the loss is then taken along the simpler path that forward names,
    each retry dropping one option, so at most two.
    """
    result = _forward_loss(model, inputs, target, path)
    while isinstance(result, LossPath):
        result = _forward_loss(model, inputs, target, result)
    return result


def _forward_loss(model: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor,
                  path: LossPath) -> torch.Tensor | LossPath:
    """One forward along ``path``: the summed loss, or the path to take instead."""
    if not path.labelled_only:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        # full logits: shift the labels rather than slicing the (big) logits, which would copy them
        return _cross_entropy_sum(logits, F.pad(target, (0, 1), value=IGNORE))
    index, picked = labelled_positions(target)  # (B, K) each
    capture = HeadCapture.for_model(model) if path.fused else None
    seq = target.shape[1] + 1
    if path.prefix:  # labelled positions are all >= prefix; fillers may be any position
        logits, selected = shared_prefix_logits(model, inputs, path.prefix, index.clamp(min=path.prefix), capture)
    else:
        with head_positions(model, index, seq, capture) as applied:
            logits = model(**inputs, use_cache=False).logits  # (B, K|1|0, V) captured, (B, K, V) applied, else (B, T, V)
        selected = applied[0] and logits.shape[1] == index.shape[1]
    if capture is not None and capture.hidden is not None:
        loss = capture.loss_sum(model, logits, picked)  # a failed first-use check reuses these logits
        # None: these logits cannot give the loss (a failed check on a (B, 1) probe, or a model that changed
        # what its head returns after the check): the unfused path
        return loss if loss is not None else replace(path, fused=False)
    if selected:
        return _cross_entropy_sum(logits, picked)  # (B, K, V) vs (B, K)
    if not path.prefix and logits.shape[1] != seq:  # the model did something the selection cannot follow
        return replace(path, labelled_only=False, fused=False)
    return _cross_entropy_sum(logits, F.pad(target, (0, 1), value=IGNORE)[:, path.prefix:])  # (B, T-P, V)


def _cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_label_count(batch: dict[str, torch.Tensor]) -> int:
    """How many positions :func:`lm_loss_sum` sums over (labels after the shift)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass(frozen=True)
class Objective:
    """What the loop minimises, chosen by the *task* (causal LM, classification, seq2seq), never by the method.

    Attributes:
        loss_sum: ``(model, batch) -> (summed loss, count)``; the loop divides by the count over the whole step.
        count: how many items ``loss_sum`` sums over in a batch (known before the forward: for gradient accumulation).
        collate: ``(examples, pad_id) -> batch`` of tensors.
        metrics: ``() -> {name: value}`` of what the objective saw since it was last asked (logged with the loss:
            e.g. the preference objectives' rewards), or None.
    """

    loss_sum: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
    count: Callable[[dict[str, torch.Tensor]], int]
    collate: Callable[[Sequence[Example], int], dict[str, torch.Tensor]] = pad_batch
    metrics: Callable[[], dict[str, float]] | None = None


def _next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return lm_loss_sum(model, batch)  # looked up when called, so a patched lm_loss_sum is the one used


def _next_token_loss_unfused(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return lm_loss_sum(model, batch, fused_loss=False)  # also looked up when called


LM_OBJECTIVE = Objective(_next_token_loss, lm_label_count)  # next-token prediction: every causal LM run


LM_OBJECTIVE_UNFUSED = Objective(_next_token_loss_unfused, lm_label_count)  # train.fused_loss=false


def objective_for(objective: Objective, cfg: TrainConfig) -> Objective:
    """The objective a run of ``cfg`` trains with: next-token prediction follows ``train.fused_loss``."""
    return LM_OBJECTIVE_UNFUSED if objective is LM_OBJECTIVE and not cfg.fused_loss else objective


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, precision: str = "fp32",
                  dist: Dist = SINGLE, objective: Objective = LM_OBJECTIVE) -> float:
    """Mean per-token loss on ``examples`` (per example for classification: see ``objective``), model put in
    eval mode, then restored.

    Distributed: each rank scores its slice of every global batch (``batch_size`` x ranks) and the sums
    are all-reduced, so every rank returns the same value and runs the same number of forwards.
    """
    was_training = model.training
    model.eval()
    device = dist.device if dist.active else model_device(model)
    total, count = 0.0, 0.0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    step = batch_size * dist.world_size
    for s in range(0, len(order), step):
        mine, weight = local_slice(order[s:s + step], dist)
        batch = {k: v.to(device) for k, v in objective.collate([examples[i] for i in mine], pad_id).items()}
        with autocast(device, precision):
            loss, n = objective.loss_sum(model, batch)
        total += float(loss) * weight
        count += n * weight
    total, count = dist.all_reduce_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def cls_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and one class index per row: ``labels`` (B,)."""
    batch = pad_batch([{"input_ids": e["input_ids"]} for e in examples], pad_id)
    batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (B,)
    return batch


def cls_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the head's logits against the class indices, and the number of examples."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss, int(batch["labels"].numel())


CLS_OBJECTIVE = Objective(loss_sum=cls_loss_sum, count=lambda b: int(b["labels"].numel()), collate=cls_collate)


def seq2seq_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder ``input_ids`` / ``attention_mask`` padded with ``pad_id``; decoder ``labels`` padded with IGNORE."""
    batch = pad_batch([{"input_ids": e["input_ids"]} for e in examples], pad_id)
    del batch["labels"]
    width = max(len(e["labels"]) for e in examples)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, L)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    return batch


def seq2seq_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens. The model builds its decoder input from ``labels``
    (shifted right, starting with its decoder start token), so logits position t predicts ``labels[:, t]``."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   use_cache=False).logits  # (B, L, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


SEQ2SEQ_OBJECTIVE = Objective(loss_sum=seq2seq_loss_sum, count=lambda b: int((b["labels"] != IGNORE).sum()),
                              collate=seq2seq_collate)
