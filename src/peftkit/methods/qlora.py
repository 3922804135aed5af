r"""QLoRA: LoRA over a quantized frozen base (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Every linear layer of the base (not the output head) is stored in 4-bit NormalFloat (NF4): blocks of 64
weights share one absmax scale, and the scales are themselves quantized to 8 bits in blocks of 256
("double quantization": ~4.13 bits per weight). Forward dequantizes to the compute dtype; LoRA's A and B
stay fp32 and are the only trainable tensors::

        x ──► dequant(Q4(W0)) ──────────────┐
        │                                   (+) ──► h = deq(W0)·x + s·B·A·x
        └──► dropout ──► A ──► B ──► · s ───┘

``bits: 8`` stores the base as int8 with one fp32 scale per output row (LLM.int8() without outliers)
instead. The quantization kernels are bitsandbytes' (CPU path; measured on an AVX2-only CPU).

What is not a linear layer stays in full precision: the input embedding and the output head are a large
share of a small model (on a 1.1B Llama with a 32k vocabulary, 131M of 1100M parameters, yet 0.52 of the
0.93 GB of a QLoRA base in fp32). ``base_dtype: bf16`` stores them in bf16 (computed in fp32: the embedding's
output and the head's weight are cast up when used, never kept) and ``quantize_head: true`` quantizes the
head like the other linear layers (bench/memory.py measures both).

The adapter file is a plain LoRA file (PEFT's ``peft_type: LORA``): it loads onto the fp32 base with
``load_adapter`` or PEFT, or onto a quantized base with :func:`load_qlora_adapter`. Merging dequantizes
the weight to fp32, adds s·B·A and keeps the fp32 weight (re-quantizing would add a second rounding
error); the merged output equals the unmerged quantized output up to fp32 rounding.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.config import ConfigError, check
from peftkit.core.inject import replace_module
from peftkit.core.registry import register
from peftkit.core.targeting import find_targets
from peftkit.methods.lora import LoraConfig, LoraLinear, attach_lora

BLOCK = 64  # weights per NF4 scale (bitsandbytes' CPU default)


class _NoKernelHubNotice(logging.Filter):
    """Drops bitsandbytes' warning, logged on import on AVX512-BF16 CPUs, that the optional ``kernels`` hub package
    is missing: peftkit never uses that kernel (its own NF4 path runs on CPU; _nf4.py), so there is nothing to act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# installed before anything imports bitsandbytes: registering the methods imports this module first
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA settings: every LoRA field, plus how the base is stored.

    Attributes:
        bits: 4 (NF4/FP4, block-wise) or 8 (int8, per output row).
        quant_type: 4-bit data type, ``nf4`` (the paper's) or ``fp4``.
        double_quant: quantize the 4-bit block scales too (saves ~0.37 bits per weight).
        base_dtype: storage of the frozen weights that are not quantized (input embedding, output head):
            ``fp32``, or ``bf16`` (half the bytes; still computed in fp32). Norms and biases stay fp32.
        quantize_head: quantize the output head too (the paper and most tools keep it in full precision:
            its error reaches the logits directly). A tied head gets its own quantized copy.
        target_modules: LoRA targets; default ``all-linear`` (the paper adapts every linear layer).
    """

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    base_dtype: Literal["fp32", "bf16"] = "fp32"
    quantize_head: bool = False

    def validate(self) -> None:
        super().validate()
        check(self.bits in (4, 8), f"method.bits must be 4 or 8, got {self.bits!r}")
        check(self.quant_type in ("nf4", "fp4"), f"method.quant_type must be nf4 or fp4, got {self.quant_type!r}")
        check(self.base_dtype in ("fp32", "bf16"), f"method.base_dtype must be fp32 or bf16, got {self.base_dtype!r}")
        check(isinstance(self.quantize_head, bool), f"method.quantize_head must be true or false, got {self.quantize_head!r}")

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return False  # a QLoRA file is a LoRA file: it loads as LoRA unless load_qlora_adapter is used


class QLoraLinear(LoraLinear):
    """LoRA over a bitsandbytes ``Linear4bit``/``Linear8bitLt``: the sizes come from the layer, not from the
    packed weight, and merging dequantizes into an fp32 ``nn.Linear`` that replaces the quantized one."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features  # not the packed shape

    def _adapter_dtype(self) -> torch.dtype:
        return torch.float32

    def _apply_delta(self, adapter: str, sign: float) -> None:
        if is_quantized(self.base_layer):
            self.base_layer = dequantize_linear(self.base_layer)
        super()._apply_delta(adapter, sign)


def is_quantized(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_linear(linear: nn.Linear, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """A bitsandbytes copy of ``linear`` with its weight quantized (bias kept as is, frozen)."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    bias = linear.bias is not None
    if bits == 4:
        from peftkit.methods._nf4 import BlockwiseLinear4bit, quantize_4bit_by_rows

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
            from peftkit.methods._nf4 import dequantize_4bit

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


def quantize_base(model: nn.Module, config: QLoraConfig,
                  materialize: Callable[[str, nn.Linear], None] | None = None) -> list[str]:
    """Replace every linear layer except the output head (unless ``quantize_head``) by its quantized copy;
    store the other large frozen weights in ``base_dtype``. Returns the quantized layers' names.

    Layers are quantized one at a time, and the fp32 pages of a weight read from a memory-mapped
    checkpoint are handed back to the OS as soon as its quantized copy exists (:func:`_release_file_pages`):
    the whole fp32 checkpoint is never resident at once.

    Args:
        model: the model (CPU, or the meta device).
        config: the QLoRA settings.
        materialize: for a model built on the meta device: called as ``materialize(name, layer)`` with the
            layer moved to empty CPU memory, to fill its fp32 weight just before it is quantized (a large
            model is then built layer by layer and its fp32 copy never exists). Without it, meta weights stay
            meta and are only marked with the bytes they would take (``peftkit_stored_bytes``, for
            ``peftkit memory``).

    A layer an earlier QLoRA adapter wraps is already quantized and stays as it is (the wrapper keeps that
    adapter; the new one is added beside it).

    Raises:
        ConfigError: a GPT-2 ``Conv1D`` layer (bitsandbytes quantizes ``nn.Linear``); a layer quantized otherwise
            (``bits``/``quant_type``) by an earlier adapter; a layer an fp32 method already wraps.
    """
    names = find_targets(model, "all-linear", config.exclude, accept=lambda m: isinstance(m, nn.Linear) or
                         type(m).__name__ == "Conv1D")
    head = _head_name(model) if config.quantize_head else None
    if head is not None and head not in names:
        names.append(head)
    for name in names:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", module)  # find_targets names a wrapped layer by its wrapper
        if type(base).__name__ == "Conv1D":
            raise ConfigError(f"QLoRA quantizes nn.Linear layers; {name!r} is a GPT-2 Conv1D (use lora for this model)")
        if is_quantized(base):
            _check_same_quantization(name, base, config)
            continue
        if base is not module:
            raise ConfigError(f"module {name!r} is a {type(module).__name__} around an unquantized layer (an fp32 "
                              "adapter, or a merged one): QLoRA cannot quantize under it; inject QLoRA first")
        shared = name == head and _tied_to_input(model, module)
        if name == head:
            module = _own_linear(module)  # a tied head gets a weight of its own: the embedding stays as it is
        if module.weight.is_meta and materialize is not None:
            module = module.to_empty(device="cpu")
            materialize(name, module)
        if module.weight.is_meta:
            module.weight.peftkit_stored_bytes = quantized_bytes(module.weight.numel(), config.bits,
                                                                 config.double_quant, module.out_features)
            module.weight.peftkit_quant_bits = config.bits
            continue
        weight = module.weight
        replace_module(model, name, quantize_linear(module, config.bits, config.quant_type, config.double_quant))
        del module
        if not shared:  # the embedding still reads a tied head's pages
            _release_file_pages(weight)
    if config.base_dtype == "bf16":
        _store_in_bf16(model)
    _own_storage(model)
    _trim_heap()
    return names


def _check_same_quantization(name: str, layer: nn.Module, config: QLoraConfig) -> None:
    """A second adapter adds to the quantized base as it is: its storage settings must be the base's."""
    import bitsandbytes as bnb

    bits = 4 if isinstance(layer, bnb.nn.Linear4bit) else 8
    if bits != config.bits:
        raise ConfigError(f"method.bits={config.bits}: {name!r} is already quantized to {bits} bits by an earlier adapter")
    quant_type = getattr(layer.weight, "quant_type", config.quant_type) if bits == 4 else config.quant_type
    if quant_type != config.quant_type:
        raise ConfigError(f"method.quant_type={config.quant_type}: {name!r} is already stored as {quant_type} by an earlier adapter")


def _head_name(model: nn.Module) -> str | None:
    """The output head's name if it is a plain ``nn.Linear`` (else None: nothing to quantize)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or type(head) is not nn.Linear:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _tied_to_input(model: nn.Module, head: nn.Linear) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return emb is not None and getattr(emb, "weight", None) is head.weight


def _own_linear(linear: nn.Linear) -> nn.Linear:
    """``linear`` with a weight Parameter of its own (the same data), so that replacing it does not touch
    a module it is tied to."""
    linear.weight = nn.Parameter(linear.weight.data, requires_grad=False)
    return linear


UPCAST_ROWS = 4096  # weight rows cast up at a time: 32 MB of fp32 for a 2048-wide head


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


def _embedding_output_fp32(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _store_in_bf16(model: nn.Module) -> None:
    """Store the input embedding and an unquantized output head in bf16, computed in fp32."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    with torch.no_grad():
        if isinstance(emb, nn.Embedding) and emb.weight.dtype == torch.float32:
            old = emb.weight.data
            emb.weight.data = old.to(torch.bfloat16)  # a tied head shares the Parameter: converted with it
            _release_file_pages(old)
            del old
            emb.register_forward_hook(_embedding_output_fp32)
        if type(head) is nn.Linear:  # the whole base is frozen under QLoRA
            if head.weight.dtype == torch.float32:
                old = head.weight.data
                head.weight.data = old.to(torch.bfloat16)
                _release_file_pages(old)
                del old
            name = next(n for n, m in model.named_modules() if m is head)
            replace_module(model, name, LowPrecisionLinear(head))


def _own_storage(model: nn.Module) -> None:
    """Copy the tensors left in full precision (embeddings, norms, head) into memory of their own.

    transformers loads safetensors weights as views of one memory-mapped file: while any tensor views it,
    every page read during quantization stays resident, and the fp32 checkpoint would be held for the
    whole run (measured on smollm2-135m: 1002 MB resident after quantizing, 705 MB after this copy).
    """
    with torch.no_grad():
        for module in model.modules():
            if is_quantized(module):
                continue
            for key, p in list(module._parameters.items()) + list(module._buffers.items()):
                if p is not None and p.device.type == "cpu" and not p.is_meta and _file_backed(p):
                    old = p.data
                    p.data = old.clone()
                    _release_file_pages(old)
                    del old


def _trim_heap() -> None:
    """Hand the freed quantization temporaries back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    bitsandbytes' CPU quantization of one layer allocates ~5x the layer's fp32 size in temporaries; glibc
    keeps most of it once freed (measured on smollm2-135m: 869 MB resident after quantizing, 671 MB after
    the trim), and that would sit under the whole training run.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


# -- memory-mapped checkpoints ------------------------------------------------------------------------------
_MADV_DONTNEED = 4
_PAGE = 4096


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process that map a file (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith("/") and parts[4] != "0":
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def _file_backed(t: torch.Tensor) -> bool:
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return False
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in _file_mappings())


def _release_file_pages(t: torch.Tensor) -> None:
    """Drop from this process's memory the pages of ``t`` that are mapped from a file (a safetensors
    checkpoint), once a quantized copy has replaced it.

    ``madvise(MADV_DONTNEED)`` on a file mapping only unmaps the pages: read again, they come back from
    the file. Only pages lying wholly inside ``t`` are touched, and only when ``t`` is file-backed
    (anonymous memory would be zeroed). Without this, the pages of every layer read while quantizing stay
    resident until the last tensor viewing the file is freed: the whole fp32 checkpoint, at the peak.
    """
    if t.is_meta or not _file_backed(t):
        return
    start = -(-t.data_ptr() // _PAGE) * _PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, _MADV_DONTNEED)


@register("qlora", QLoraConfig, "QLoRA: LoRA (fp32) over a 4-bit NF4 (or 8-bit) quantized frozen base (mergeable to fp32)")
def attach_qlora(model: nn.Module, config: QLoraConfig, adapter_name: str) -> list[str]:
    quantize_base(model, config)
    if config.target_modules is None:  # the paper adapts every linear layer
        config = dataclasses.replace(config, target_modules="all-linear")
    return attach_lora(model, config, adapter_name, linear_cls=QLoraLinear)


def load_qlora_adapter(model: nn.Module, path: str | os.PathLike, bits: int = 4, adapter_name: str = "default",
                       trainable: bool = False) -> nn.Module:
    """Load a (Q)LoRA adapter file (PEFT's LoRA format) onto ``model``, quantizing its base to ``bits``.

    Raises:
        AdapterFileError: the folder, its config or its weights are missing or do not fit the model.
    """
    from safetensors.torch import load_file

    from peftkit.core import io
    from peftkit.core.adapter import adapter_parameters
    from peftkit.core.inject import inject
    from peftkit.errors import AdapterFileError

    lora = LoraConfig.from_peft(io.read_adapter_config(path))
    config = QLoraConfig(**{f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)}, bits=bits)
    weights = os.path.join(path, io.WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise AdapterFileError(f"{weights}: missing (only safetensors adapters are loaded)")
    inject(model, config, adapter_name)
    io._copy_into(model, adapter_name, load_file(weights), weights)
    if not trainable:
        for _, p in adapter_parameters(model, adapter_name):
            p.requires_grad_(False)
    return model


__all__ = ["LowPrecisionLinear", "RowBlockMatmul", "QLoraConfig", "QLoraLinear", "dequantize_linear", "dequantize_weight", "load_qlora_adapter",
           "quantize_base", "quantize_linear", "quantized_bytes"]
