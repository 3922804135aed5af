"""The training loop's settings (``train:`` in a run config): steps, batch, optimizer, precision, checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from peftkit.core.config import check


@dataclass
class TrainConfig:
    """Attributes:
        max_steps: optimizer steps to run.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size x grad_accum). A step trains on
            the examples one batch of batch_size x grad_accum would hold (formed, length-grouped, at that size and cut
            into grad_accum micro-batches; an epoch's short last step included); with ``data.packing`` the
            micro-batches are consecutive token-budget runs of the epoch's shuffled order.
        lr: peak learning rate (AdamW); default: the method's (``peftkit info`` lists them).
        weight_decay: AdamW weight decay.
        schedule: ``cosine``, ``linear`` (decay to 0) or ``constant``, after warmup.
        warmup_steps: linear warmup from 0.
        max_grad_norm: clip the gradient norm to this (0 disables clipping).
        seed: seeds data order, adapter init and dropout.
        eval_every: validation loss every N steps (0: only at the end).
        save_every: checkpoint every N steps (0: none).
        keep_checkpoints: how many recent checkpoints to keep.
        log_every: write metrics every N steps.
        precision: ``auto`` (bf16 autocast where the hardware computes bf16 natively: CUDA with bf16, a CPU
            with AVX512-BF16 or AMX; fp32 elsewhere), ``fp32``, or ``bf16`` autocast. Adapter weights stay fp32.
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` the model's layer blocks (regional: one compile per block class); the
            first steps are slow while it compiles. Off by default: see BENCHMARKS.md for what it gains.
        threads: torch CPU threads (default: torch's choice).
        distributed: ``auto`` (DDP when started by torchrun with several processes, else one process),
            ``none``, ``ddp``, or ``fsdp`` (shard the model over ranks: for models that do not fit one
            device). ``batch_size`` is per rank: effective batch = batch_size x ranks x grad_accum.
        on_nan: a NaN/inf loss or gradient norm: ``stop`` (naming the step and the last good checkpoint)
            or ``skip`` the batch (gives up after 10 bad steps in a row).
        optimizer: ``adamw`` (torch), or bitsandbytes' ``adamw_8bit`` (8-bit states) / ``paged_adamw_8bit``
            (8-bit states in paged memory) on CUDA. Elsewhere those print a note and use torch's AdamW (on a
            CPU bitsandbytes' AdamW8bit measured ~4x slower, and adapter states are small).
        fused_loss: next-token runs take the loss with the LM head and cross-entropy fused, by chunks of
            positions with their gradients in the same pass (:mod:`peftkit.train.lm_head`): the same loss and
            gradients to float rounding, without the (batch x labelled positions x vocabulary) logits (less
            memory, a little faster: BENCHMARKS.md). Applies where the model's head is a plain ``nn.Linear``
            whose output it returns and the run is not distributed; elsewhere (an adapted or quantized head,
            soft-capped logits, DDP/FSDP) the plain loss runs anyway. ``false``: the training and validation
            losses are always the plain one.
        objective: what the run minimises: ``auto`` (next-token prediction, or ``dpo`` for preference data),
            ``sft``, or a preference objective on pairs: ``dpo``, ``ipo``, ``hinge``, ``orpo``, ``simpo``
            (:mod:`peftkit.train.preference`).
        beta: the preference objectives' β (DPO's temperature; ORPO's weight of the odds-ratio term).
        label_smoothing: conservative DPO's ε (``dpo`` only), in [0, 0.5).
        simpo_gamma: SimPO's target margin γ.
        precompute_reference: compute the reference log-probabilities once, before training, with the model as
            it starts (instead of one no-gradient forward with the adapters switched off each step). Always done
            for methods that change base tensors (full, selective, BitFit, linear probe) and for a run that starts
            from an adapter (the reference is then that adapter, frozen).
    """

    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    threads: int | None = None
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    on_nan: Literal["stop", "skip"] = "stop"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    fused_loss: bool = True
    objective: Literal["auto", "sft", "dpo", "ipo", "hinge", "orpo", "simpo"] = "auto"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        check(self.beta > 0 and math.isfinite(self.beta), f"train.beta must be a finite number > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(math.isfinite(self.simpo_gamma), f"train.simpo_gamma must be finite, got {self.simpo_gamma}")
        check(self.threads is None or self.threads > 0, f"train.threads must be > 0, got {self.threads}")
        check(isinstance(self.fused_loss, bool), f"train.fused_loss must be true or false, got {self.fused_loss!r}")
        check(self.optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit"),
              f"train.optimizer must be adamw, adamw_8bit or paged_adamw_8bit, got {self.optimizer!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
              f"train.lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"train.{name} must be a finite number >= 0, got {value}")
        check(self.threads is None or self.threads <= 4096, f"train.threads must be <= 4096, got {self.threads}")
