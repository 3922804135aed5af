r"""A 4-bit linear layer for QLoRA's frozen base that dequantizes its weight a block of rows at a time (CPU).

bitsandbytes' CPU path for a 4-bit layer (``matmul_4bit``) dequantizes the whole weight to the compute dtype
in forward, computes ``x·Wᵀ``, and dequantizes the whole weight again in backward for ``grad·W``: a transient
fp32 copy as large as the layer (46 MB for a 5632 x 2048 MLP projection, 262 MB for a 32000 x 2048 head),
and its quantization allocates temporaries several times the fp32 weight. On a 1.1B Llama these were the
largest transients of a QLoRA run (bench/memory.py, BENCHMARKS.md "Memory").

Here the weight is dequantized by blocks of output rows of at most :data:`BLOCK_BYTES` each, and each block's
product is written into its columns of the output (``out[:, rows] = x·W[rows]ᵀ``; backward accumulates
``grad[:, rows]·W[rows]``): the same values (the same dequantization kernel, the block boundaries on the
quantization blocks: outputs and input gradients equal to float rounding), no transient larger
than one block, and faster (the block is still in cache when the matmul reads it: 0.73-0.84x the time of
bitsandbytes' path for 2048-wide layers on this CPU, equal on small ones; tests/methods/test_qlora.py). Every
block lands in one reused buffer per thread (:func:`peftkit.methods.qlora.scratch`): a fresh allocation per block
was ~3 GB of memory a step on a 1.1B model that an allocator handing pages back (jemalloc) faulted in again
(~800k page faults a step, ~4 s of a 29 s step on this VM).

:func:`quantize_4bit_by_rows` quantizes the same way, a block of rows at a time. The blocks compute in the
input's dtype (fp32 under peftkit's defaults; under bf16 autocast too, where bitsandbytes' path would compute
in bf16). On CUDA, and for a weight repacked for AVX512-BF16 inference, bitsandbytes' own kernels run unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import get_ptr
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from peftkit.methods.qlora import RowBlockMatmul, scratch

#: fp32 bytes of weight rows dequantized at a time (measured 1-8 MB: 4 MB was as fast as any)
BLOCK_BYTES = 4 * 2**20


def block_absmax(quant_state: Any) -> torch.Tensor:
    """The fp32 scale of every quantization block (undoing double quantization): ``numel / blocksize`` values."""
    if quant_state.nested:
        state2 = quant_state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            quant_state.absmax, state2.absmax, state2.code, state2.blocksize, torch.float32)
        return absmax + quant_state.offset
    return quant_state.absmax.float()


def block_rows(out_features: int, in_features: int, blocksize: int) -> int:
    """Rows per dequantized block: about :data:`BLOCK_BYTES` of fp32, starting on a quantization block."""
    step = blocksize // math.gcd(in_features, blocksize)  # rows whose values fill whole quantization blocks
    return min(out_features, max(step, BLOCK_BYTES // (4 * in_features) // step * step))


def dequantized_blocks(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, W[rows] in dtype)`` for consecutive blocks of rows of a 4-bit weight (out, in).

    An fp32 block is a view of this thread's :func:`scratch` buffer, valid until the next block is asked for."""
    out_features, in_features = quant_state.shape
    blocksize = quant_state.blocksize
    rows = block_rows(out_features, in_features, blocksize)
    absmax = block_absmax(quant_state)  # (numel / blocksize,)
    flat = packed.view(-1)  # two 4-bit values per byte, row-major
    for first in range(0, out_features, rows):
        n = min(rows, out_features - first)
        lo, hi = first * in_features, (first + n) * in_features  # value range, lo on a block boundary
        weight = _dequantize_rows(flat[lo // 2:(hi + 1) // 2], absmax[lo // blocksize:-(-hi // blocksize)],
                                  blocksize, quant_state.quant_type, n, in_features)  # (n, in)
        yield first, weight if dtype == torch.float32 else weight.to(dtype)


def _dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int,
                     in_features: int) -> torch.Tensor:
    """(n, in) fp32 values of ``n`` whole rows, written into this thread's :func:`scratch` buffer by
    bitsandbytes' own CPU kernel (its op has no CPU ``out=`` variant); elsewhere, or where its CPU op takes
    another route (odd widths; AVX512 with blocks >= 2048), the op itself (a fresh tensor)."""
    kernel = getattr(_native_lib(), f"cdequantize_blockwise_cpu_{quant_type}_fp32", None)
    if (packed.device.type != "cpu" or kernel is None or in_features % 2
            or (blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512")):
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type,
                                                              (n, in_features), torch.float32)
    out = scratch(n * in_features, packed.device).view(n, in_features)  # overwritten by the next block
    packed, absmax = packed.view(torch.uint8).contiguous(), absmax.float().contiguous()
    kernel(get_ptr(packed), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(n),
           ctypes.c_longlong(in_features))
    return out


@functools.cache
def _native_lib() -> Any:
    from bitsandbytes.cextension import lib

    return lib


def quantize_4bit_by_rows(weight: torch.Tensor, quant_type: str, double_quant: bool,
                          blocksize: int) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' ``quantize_4bit`` of a (out, in) weight, run a block of rows at a time: the same packed
    bytes and quantization state (blocks of ``blocksize`` values are quantized independently; the double
    quantization of the scales runs once over all of them), without temporaries the size of the whole weight
    (bitsandbytes' CPU quantization allocates ~2-5x its input: 0.8 GB at the peak for a 32000 x 2048 head).

    Returns:
        (packed bytes ((numel + 1) // 2, 1) uint8, QuantState)
    """
    out_features, in_features = weight.shape
    numel = weight.numel()
    packed = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-numel // blocksize), dtype=torch.float32, device=weight.device)
    rows = block_rows(out_features, in_features, blocksize)
    for first in range(0, out_features, rows):
        n = min(rows, out_features - first)
        lo, hi = first * in_features, (first + n) * in_features
        part, scales = torch.ops.bitsandbytes.quantize_4bit.default(
            weight[first:first + n].contiguous(), blocksize, quant_type, torch.uint8)
        packed[lo // 2:(hi + 1) // 2] = part.view(-1, 1)
        absmax[lo // blocksize:-(-hi // blocksize)] = scales.view(-1)
        del part, scales
    code = bnb.functional.get_4bit_type(quant_type, device=weight.device)
    shape = weight.shape
    if not double_quant:
        return packed, bnb.functional.QuantState(absmax=absmax, shape=shape, dtype=weight.dtype, blocksize=blocksize,
                                                 code=code, quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnb.functional.QuantState(absmax=qabsmax, shape=shape, dtype=weight.dtype, blocksize=blocksize,
                                             code=code, quant_type=quant_type, offset=offset, state2=state2)


class BlockwiseLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` (same parameters, state dict and CUDA path) whose CPU forward and backward
    dequantize the weight by blocks of rows (:class:`peftkit.methods.qlora.RowBlockMatmul`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fix_4bit_weight_quant_state_from_module(self)  # as bitsandbytes' forward: a state lost by a copy
        state = self.weight.quant_state
        if x.device.type != "cpu" or state is None or getattr(state, "packing_format_for_cpu", False):
            return super().forward(x)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        compute = self.compute_dtype or x.dtype
        flat = x.to(compute).reshape(-1, x.shape[-1])  # (M, in)
        packed = self.weight.data
        blocks = functools.partial(dequantized_blocks, packed, state)  # only the packed bytes kept for backward
        out = RowBlockMatmul.apply(flat, blocks, self.out_features).view(*x.shape[:-1], -1)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(compute)
        return out.to(x.dtype)


__all__ = ["BLOCK_BYTES", "BlockwiseLinear4bit", "block_absmax", "block_rows", "dequantized_blocks",
           "quantize_4bit_by_rows"]
