"""Gradients of a Trainer's optimizer steps, for tests that two ways of running a step are the same.

Why gradients and not the weights after the step: two runs that differ only in summation order (a batch
split in sub-batches, gradient accumulation vs a bigger batch, 2 ranks vs 1) get gradients equal to
float rounding, but Adam's first update is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``: a gradient
element whose true value is at rounding level (near-zero, from cancellation) can change sign between
the runs and move its weight by ``2 * lr`` (0.02 at lr 1e-2, seen on an AVX512 CPU, issue #23).
Comparing the gradients the optimizer receives checks the claim (the same loss sum, the same tokens,
the same scale) without that amplification.
"""

from __future__ import annotations

import torch

#: fp32 unit roundoff (half of torch.finfo(torch.float32).eps = 1.19e-7)
FP32_U = 2.0 ** -24


def record_step_grads(trainer, hold_weights: bool = False) -> list[dict[str, torch.Tensor]]:
    """A list filled with ``{name: gradient}`` of the trainable parameters, taken just before each optimizer step
    (after clipping: what the optimizer receives).

    ``hold_weights``: zero the gradients once copied, so the step leaves every weight where it was (AdamW with a
    zero gradient and no weight decay moves nothing: m = v = 0, update 0 / (0 + eps) = 0). Every step's
    gradient is then computed at the same weights, on that step's data, and a later step can be compared as
    tightly as the first.
    """
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    steps: list[dict[str, torch.Tensor]] = []

    def before_step(optimizer, args, kwargs) -> None:
        grads = {}
        for group in optimizer.param_groups:
            assert not hold_weights or group["weight_decay"] == 0
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()
                    if hold_weights:
                        p.grad.zero_()
        steps.append(grads)

    trainer.optimizer.register_step_pre_hook(before_step)
    return steps


def assert_same_sums(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    """``actual`` and ``expected`` are the same fp32 sums taken in different orders: each tensor is compared with
    ``atol = rtol * max|expected|`` (and ``rtol``).

    Reordering an n-term fp32 sum moves it by at most ``n * u * sum|terms|`` (u = 2^-24, Higham's bound), and the
    magnitudes summed are of the order of the tensor's largest gradient, so ``rtol`` is ``n * u`` for the longest
    reduction a gradient goes through (each caller says which). A wrong sum (a missing sub-batch or
    micro-batch, a token counted twice, a mean taken per part instead of over the step) is off by a percent or
    more of that scale.
    """
    assert actual.keys() == expected.keys() and actual
    for name, e in expected.items():
        scale = float(e.abs().max())
        assert scale > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(actual[name], e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")
