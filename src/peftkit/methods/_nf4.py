r"""A 4-bit linear layer for QLoRA's frozen base that dequantizes its weight a block of rows at a time (CPU).

bitsandbytes' CPU path for a 4-bit layer (``matmul_4bit``) dequantizes the whole weight to the compute dtype
in forward, computes ``x·Wᵀ``, and dequantizes the whole weight again in backward for ``grad·W``: a transient
fp32 copy as large as the layer (46 MB for a 5632 x 2048 MLP projection, 262 MB for a 32000 x 2048 head),
and its quantization allocates temporaries several times the fp32 weight. On a 1.1B Llama these were the
largest transients of a QLoRA run (bench/memory.py, BENCHMARKS.md "Memory").

Here the weight is dequantized by blocks of output rows of at most :data:`~peftkit.methods._row_blocks.BLOCK_BYTES`
each, and each block's product is written into its columns of the output (``out[:, rows] = x·W[rows]ᵀ``;
backward accumulates ``grad[:, rows]·W[rows]``): the same values (the same dequantization kernel, the block boundaries on the
quantization blocks: outputs and input gradients equal to float rounding; where that kernel would compute
wrong scales, bitsandbytes 0.50.2's AVX512 path for widths not a multiple of the block size, a pure-torch
dequantization of the same values instead: :func:`_kernel_is_safe`), no transient larger
than one block, and faster (the block is still in cache when the matmul reads it: 0.73-0.84x the time of
bitsandbytes' path for 2048-wide layers on this CPU, equal on small ones; tests/methods/test_qlora.py). Every
block lands in one reused buffer per thread (:func:`peftkit.methods._row_blocks.scratch`): a fresh allocation per block
was ~3 GB of memory a step on a 1.1B model that an allocator handing pages back (jemalloc) faulted in again
(~800k page faults a step, ~4 s of a 29 s step; BENCHMARKS.md, "Memory").

:func:`peftkit.methods.quantize.quantize_4bit_by_rows` quantizes the same way, a block of rows at a time. The
blocks compute in the input's dtype (fp32 under peftkit's defaults; under bf16 autocast too, where bitsandbytes' path would compute
in bf16). On CUDA, and for a weight repacked for AVX512-BF16 inference, bitsandbytes' own kernels run unchanged.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import get_ptr
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from peftkit.methods._row_blocks import RowBlockMatmul, block_absmax, block_rows, scratch


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
    bitsandbytes' own CPU kernel (its op has no CPU ``out=`` variant) where that kernel is right
    (:func:`_kernel_is_safe`; even widths), else by :func:`_dequantize_torch` (the same values); off the CPU,
    bitsandbytes' op (a fresh tensor)."""
    if packed.device.type != "cpu":
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type,
                                                              (n, in_features), torch.float32)
    out = scratch(n * in_features, packed.device).view(n, in_features)  # overwritten by the next block
    packed, absmax = packed.view(torch.uint8).contiguous(), absmax.float().contiguous()
    kernel = getattr(_native_lib(), f"cdequantize_blockwise_cpu_{quant_type}_fp32", None)
    if kernel is None or in_features % 2 or not _kernel_is_safe(in_features, blocksize, n):
        _dequantize_torch(packed.view(-1), absmax, blocksize, quant_type, out.view(-1))
        return out
    kernel(get_ptr(packed), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(n),
           ctypes.c_longlong(in_features))
    return out


def _kernel_is_safe(in_features: int, blocksize: int, rows: int = 2) -> bool:
    """Whether bitsandbytes' CPU 4-bit kernel (``cdequantize_blockwise_cpu_{nf4,fp4}_*``) dequantizes a
    (rows, in_features) weight right on this CPU.

    Its AVX512 path (taken when the CPU has AVX512F, by CPUID, whatever torch's capability) in bitsandbytes
    0.50.2 checks ``in_features % 16 == 0`` but not ``in_features % blocksize == 0``, and scales value
    (row, col) by ``absmax[row * (in_features // blocksize) + col // blocksize]`` (found by disassembling its
    CPU library and emulating that loop; issue #23). The right scale is ``absmax[(row * in_features + col) //
    blocksize]`` (blocks run along the flattened weight): the two agree for every value only when
    ``in_features`` is a multiple of ``blocksize`` or there is a single row (row 0); otherwise a row boundary
    falls inside a block and every row after the first gets wrong scales. Its scalar and AVX2 paths index
    the flattened weight and are right. bitsandbytes itself avoids the AVX512 path for ``blocksize >= 2048``
    (accuracy issues): so does this.
    """
    if not _cpu_has_avx512f():
        return True
    return blocksize < 2048 and (in_features % blocksize == 0 or rows <= 1)


@functools.cache
def _cpu_has_avx512f() -> bool:
    """Whether this CPU has AVX512F, as bitsandbytes' kernels decide (its native ``has_avx512f_cpu``, CPUID);
    where that is missing, the ``avx512f`` flag of /proc/cpuinfo (Linux); else False."""
    try:
        return bool(_native_lib().has_avx512f_cpu())
    except (AttributeError, RuntimeError, OSError):  # an older or a mock library: no such symbol
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


@functools.cache
def _code_pairs(quant_type: str, device: str) -> torch.Tensor:
    """(256, 2) fp32: the 4-bit code values of a byte's high and low nibble (the high one comes first)."""
    code = bnb.functional.get_4bit_type(quant_type, device=device).float()
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def _dequantize_torch(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                      out: torch.Tensor) -> None:
    """``out[i] = code[nibble i] * absmax[i // blocksize]`` for the ``out.numel()`` values of flat packed bytes
    (high nibble first), in pure torch: one fp32 product per value, the value bitsandbytes' kernels (and its
    default backend's ``_dequantize_4bit_compute``) compute where they are right. Temporaries ~2.5x ``out``."""
    numel = out.numel()
    values = torch.index_select(_code_pairs(quant_type, str(packed.device)), 0, packed.int()).view(-1)
    full = numel // blocksize * blocksize
    torch.mul(values[:full].view(-1, blocksize), absmax[:full // blocksize].unsqueeze(1),
              out=out[:full].view(-1, blocksize))
    if full < numel:  # a last partial block
        torch.mul(values[full:numel], absmax[full // blocksize], out=out[full:])


@functools.cache
def _native_lib() -> Any:
    from bitsandbytes.cextension import lib

    return lib


class BlockwiseLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` (same parameters, state dict and CUDA path) whose CPU forward and backward
    dequantize the weight by blocks of rows (:class:`peftkit.methods._row_blocks.RowBlockMatmul`)."""

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


__all__ = ["BlockwiseLinear4bit", "dequantized_blocks"]
