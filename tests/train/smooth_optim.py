"""SGD with momentum in place of peftkit's AdamW, for tests that two ways of running the same training (2 ranks
vs 1) give the same adapter.

Why: such runs differ only in summation order, so their gradients agree to fp32 rounding; but Adam's first
steps move a weight by about ``lr * sign(g)``, and a gradient element whose true value is at rounding level
can flip sign between the runs and move its weight by up to ``2 * lr`` (seen on an AVX512 CPU, issue #23).
SGD's update is linear in the gradients, so the runs' weights stay as close as their gradients, and that
distance has a bound from fp32 rounding (:func:`sgd_tolerance`). A real error (a wrong average across
ranks, a rank's data left out) still changes the gradients by far more.

``python -m tests.train.smooth_optim train ARGS`` runs peftkit's CLI (``peftkit train ARGS``) with this
optimizer (torchrun starts it with ``-m tests.train.smooth_optim``; the repository root must be on
``PYTHONPATH``). In-process, :func:`install` (with a ``monkeypatch``) does the same.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

#: SGD momentum: the optimizer keeps a state per parameter (a checkpoint's optimizer state is not empty)
MOMENTUM = 0.9
#: fp32 unit roundoff
FP32_U = 2.0 ** -24


def make_sgd(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """peftkit.train.optim.make_optimizer's parameter groups and learning rate, with SGD + momentum."""
    from peftkit.core.config import MethodConfig

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    lr = cfg.lr if cfg.lr is not None else MethodConfig.default_lr
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=MOMENTUM)


def install(monkeypatch=None, record: list | None = None) -> None:
    """Make peftkit's Trainer use :func:`make_sgd`. ``record``: a list that gets, before each optimizer step,
    ``(lr, {parameter name: max |gradient|})`` of the gradients the optimizer receives (after clipping)."""
    import peftkit.train.loop as loop

    def make(model: nn.Module, cfg) -> torch.optim.Optimizer:
        opt = make_sgd(model, cfg)
        if record is not None:
            names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}

            def before_step(optimizer, args, kwargs) -> None:
                lr = optimizer.param_groups[0]["lr"]
                record.append((lr, {names[id(p)]: float(p.grad.abs().max()) for g in optimizer.param_groups
                                    for p in g["params"] if p.grad is not None}))

            opt.register_step_pre_hook(before_step)
        return opt

    if monkeypatch is not None:
        monkeypatch.setattr(loop, "make_optimizer", make)
    else:
        loop.make_optimizer = make


def sgd_tolerance(steps: list[tuple[float, dict[str, float]]], name: str, rel: float) -> float:
    """How far two SGD runs' ``name`` can be apart after ``steps`` when every gradient the optimizer got differs
    between them by at most ``rel * max|gradient|`` elementwise (the same fp32 sums taken in other orders).

    SGD + momentum: ``buf_t = MOMENTUM * buf_(t-1) + g_t``, ``w_t = w_(t-1) - lr_t * buf_t``, linear in the
    gradients, so the weights differ by at most ``sum_t lr_t * sum_(s<=t) MOMENTUM^(t-s) * rel * G_s``
    (``G_s``: step s's max |gradient| of that tensor, from the reference run). That ignores the gradient
    change the (rounding-sized) weight difference itself causes in later steps; the callers' factor covers it.
    """
    total, buf = 0.0, 0.0
    for lr, grads in steps:
        buf = MOMENTUM * buf + rel * grads.get(name, 0.0)
        total += lr * buf
    return total


if __name__ == "__main__":
    install()
    from peftkit.cli.main import main

    sys.exit(main())
