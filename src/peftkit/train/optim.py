"""Optimizer and learning-rate schedule from ``TrainConfig``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from peftkit.core.adapter import default_lr
from peftkit.errors import TrainingError
from peftkit.train.config import TrainConfig
from peftkit.train.distributed import is_sharded


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.lr if cfg.lr is not None else default_lr(model)  # the method's own, as a RunConfig sets it
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer != "adamw":
        bnb_optimizer = _bnb_optimizer(cfg.optimizer, params[0].device)
        if bnb_optimizer is not None:
            return bnb_optimizer(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw_ok(params))


def fused_adamw_ok(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors) can run: plain CPU/CUDA float tensors.

    Fused does the for-loop update's arithmetic (same results to float rounding), several times faster
    on a full model's parameters; it is also the Trainer's default. Sharded (FSDP) parameters keep the loop.
    """
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return all(p.device.type in ("cpu", "cuda") and p.dtype in floats and not is_sharded(p) for p in params)


def _bnb_optimizer(name: str, device: torch.device) -> Callable[..., torch.optim.Optimizer] | None:
    """bitsandbytes' 8-bit (paged) AdamW class on CUDA; elsewhere None, after a one-line note."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        except ImportError:
            reason = "bitsandbytes is not installed"
    else:
        reason = f"they need CUDA with bitsandbytes (this run is on {device.type})"
    warnings.warn(f"train.optimizer={name}: 8-bit/paged optimizer states skipped, {reason}; using torch AdamW",
                  stacklevel=3)
    return None


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
