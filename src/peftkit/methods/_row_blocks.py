"""Row blocks of a frozen weight: the product with a weight handed over a block of output rows at a time
(:class:`RowBlockMatmul`), the rows per block (:func:`block_rows`), the reused buffer a block is written into
(:func:`scratch`) and the fp32 scales of a 4-bit weight's quantization blocks (:func:`block_absmax`). Shared by
the 4-bit CPU layer (:mod:`peftkit.methods._nf4`) and the 8-bit / bf16 layers (:mod:`peftkit.methods.quantize`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

#: fp32 bytes of weight rows dequantized at a time (measured 1-8 MB: 4 MB was as fast as any)
BLOCK_BYTES = 4 * 2**20


def block_rows(out_features: int, in_features: int, blocksize: int) -> int:
    """Rows per dequantized block: about :data:`BLOCK_BYTES` of fp32, starting on a quantization block."""
    step = blocksize // math.gcd(in_features, blocksize)  # rows whose values fill whole quantization blocks
    return min(out_features, max(step, BLOCK_BYTES // (4 * in_features) // step * step))


def block_absmax(quant_state: Any) -> torch.Tensor:
    """The fp32 scale of every quantization block (undoing double quantization): ``numel / blocksize`` values."""
    if quant_state.nested:
        state2 = quant_state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            quant_state.absmax, state2.absmax, state2.code, state2.blocksize, torch.float32)
        return absmax + quant_state.offset
    return quant_state.absmax.float()


_SCRATCH = threading.local()


def scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer of ``numel`` values, reused by this thread on this device: a block of weight rows
    (dequantized or cast up) is written here instead of a fresh allocation per block. The caller uses it before
    asking again (:class:`RowBlockMatmul` consumes each block before the next)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(device)
    if buf is None or buf.numel() < numel:
        buf = buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


class RowBlockMatmul(torch.autograd.Function):
    """y = x·Wᵀ for x (M, in) and a frozen W (out, in) handed over a block of rows at a time, in forward and
    again in backward (``blocks(dtype)`` yields ``(first row, W[rows] in dtype)``): at most one block exists in
    the compute dtype, and nothing but ``blocks`` is kept for backward. Used for a bf16 head cast up
    (:class:`LowPrecisionLinear`) and for 4-bit weights dequantized (``methods/_nf4.py``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: Callable[[torch.dtype], Any], out_features: int) -> torch.Tensor:
        ctx.blocks = blocks
        out = x.new_empty(x.shape[0], out_features)  # (M, out)
        for first, weight in blocks(x.dtype):
            torch.mm(x, weight.T, out=out[:, first:first + weight.shape[0]])  # a column block of out (BLAS ldc)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = None  # (M, in)
        for first, weight in ctx.blocks(grad.dtype):
            part = grad[:, first:first + weight.shape[0]]  # (M, n)
            grad_x = part @ weight if grad_x is None else grad_x.addmm_(part, weight)
        return grad_x, None, None


__all__ = ["BLOCK_BYTES", "RowBlockMatmul", "block_absmax", "block_rows", "scratch"]
