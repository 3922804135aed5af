r"""Frozen weights stored in fewer bits: QLoRA's 4-bit (NF4/FP4) and 8-bit bases, and a bf16 head.

4-bit (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): blocks of :data:`BLOCK` weights share one absmax
scale, and with double quantization the scales are themselves quantized to 8 bits in blocks of 256 (~4.13 bits per
weight: :func:`quantized_bytes`). 8-bit: int8 with one fp32 scale per output row (LLM.int8() without outliers).
The formats and kernels are bitsandbytes' (imported on first use: registering the methods must not load it).

Here: quantizing a layer (:func:`quantize_linear`; a CPU 4-bit weight a block of rows at a time,
:func:`quantize_4bit_by_rows`), dequantizing it for merging and export (:func:`dequantize_weight`,
:func:`dequantize_linear`), the bytes a quantized weight stores, and the bf16 head (:class:`LowPrecisionLinear`),
which computes by row blocks (:mod:`peftkit.methods._row_blocks`). Used by :mod:`peftkit.methods.qlora`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from peftkit.methods._row_blocks import RowBlockMatmul, block_rows, scratch

BLOCK = 64  # weights per NF4 scale (bitsandbytes' CPU default)
def is_quantized(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_linear(linear: nn.Linear, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """A bitsandbytes copy of ``linear`` with its weight quantized (bias kept as is, frozen)."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    bias = linear.bias is not None
    if bits == 4:
        from peftkit.methods._nf4 import BlockwiseLinear4bit

        q = BlockwiseLinear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
        if w.device.type == "cpu":  # quantized a block of rows at a time: no whole-weight temporaries
            packed, state = quantize_4bit_by_rows(w.to(torch.float32), quant_type, double_quant, BLOCK)
            q.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                         compress_statistics=double_quant, quant_type=quant_type, module=q,
                                         bnb_quantized=True)
        else:  # bitsandbytes quantizes on the device when the weight is moved there (below)
            q.weight = bnb.nn.Params4bit(w.to(torch.float32).cpu(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quant_type, blocksize=BLOCK)
        # the AVX512-BF16 inference repacking in eval() would cut gradients to the input (MEASURED.md)
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.to(torch.float32).cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(torch.float32).cpu().clone(), requires_grad=False)
    q = q.to(w.device)  # bitsandbytes quantizes when the weight is moved to its device
    q.train(linear.training)
    return q


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight (out, in) a quantized layer computes with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if module.weight.device.type == "cpu" and not getattr(state, "packing_format_for_cpu", False):
            # not bitsandbytes' CPU op: its kernel scales rows with wrong absmax on AVX512 CPUs when in_features
            # is not a multiple of the block size (bitsandbytes 0.50.2; _nf4._kernel_is_safe)
            return dequantize_4bit(module.weight.data, state)
        return bf.dequantize_4bit(module.weight.data, state).to(torch.float32)
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    return bf.int8_vectorwise_dequant(module.weight.data, scb).to(torch.float32)  # (out, in)


def dequantize_linear(module: nn.Module) -> nn.Linear:
    """An fp32 ``nn.Linear`` equal to what the quantized layer computes."""
    weight = dequantize_weight(module)  # (out, in)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(torch.float32))
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def quantized_bytes(numel: int, bits: int, double_quant: bool = True, rows: int = 1) -> int:
    """Bytes a quantized weight of ``numel`` values occupies (packed data + scales)."""
    if bits == 8:
        return numel + 4 * rows
    blocks = -(-numel // BLOCK)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks  # uint8 + fp32 per 256, or fp32
    return -(-numel // 2) + scales


def quantize_4bit_by_rows(weight: torch.Tensor, quant_type: str, double_quant: bool,
                          blocksize: int) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' ``quantize_4bit`` of a (out, in) weight, run a block of rows at a time: the same packed
    bytes and quantization state (blocks of ``blocksize`` values are quantized independently; the double
    quantization of the scales runs once over all of them), without temporaries the size of the whole weight
    (bitsandbytes' CPU quantization allocates ~2-5x its input: 0.8 GB at the peak for a 32000 x 2048 head).

    Returns:
        (packed bytes ((numel + 1) // 2, 1) uint8, QuantState)
    """
    import bitsandbytes as bnb

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


def dequantize_4bit(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The fp32 weight (out, in) of a CPU 4-bit layer, in a tensor of its own: its
    :func:`~peftkit.methods._nf4.dequantized_blocks` (bitsandbytes' kernel where it computes the right values,
    :func:`~peftkit.methods._nf4._kernel_is_safe`; else pure torch) copied in. What merging and export use (:func:`dequantize_weight`) instead of bitsandbytes'
    ``dequantize_4bit``, whose CPU op runs the kernel on the whole weight whatever its width."""
    from peftkit.methods._nf4 import dequantized_blocks

    out_features, in_features = quant_state.shape
    weight = torch.empty(out_features, in_features, dtype=torch.float32, device=packed.device)
    for first, block in dequantized_blocks(packed, quant_state, torch.float32):
        weight[first:first + block.shape[0]] = block
    if quant_state.dtype != torch.float32:  # bitsandbytes dequantizes to the stored dtype
        weight = weight.to(quant_state.dtype).to(torch.float32)
    return weight


UPCAST_ROWS = 4096  # weight rows cast up at a time: 32 MB of fp32 for a 2048-wide head

def _upcast_blocks(weight: torch.Tensor) -> Callable[[torch.dtype], Any]:
    """Blocks of ``UPCAST_ROWS`` rows of a low-precision ``weight``, cast to the asked dtype."""
    def blocks(dtype: torch.dtype) -> Any:
        for i in range(0, weight.shape[0], UPCAST_ROWS):
            rows = weight[i:i + UPCAST_ROWS]  # (rows, in)
            if dtype == torch.float32:
                yield i, scratch(rows.numel(), rows.device).view(rows.shape).copy_(rows)
            else:
                yield i, rows.to(dtype)
    return blocks


class LowPrecisionLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in bf16 and computed in the input's dtype (QLoRA's
    ``base_dtype: bf16`` output head). Same state dict as ``nn.Linear``; a tied weight stays tied."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters (ties kept)
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (M, in); F.linear(x, W.float()) would hold the whole fp32 copy
        out = RowBlockMatmul.apply(flat, _upcast_blocks(self.weight), self.out_features).view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias.to(out.dtype)


__all__ = ["BLOCK", "LowPrecisionLinear", "dequantize_4bit", "dequantize_linear", "dequantize_weight", "is_quantized",
           "quantize_4bit_by_rows", "quantize_linear", "quantized_bytes"]
