r"""QLoRA: LoRA over a quantized frozen base (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Every linear layer of the base (not the output head) is stored in 4-bit NormalFloat (NF4): blocks of 64
weights share one absmax scale, and the scales are themselves quantized to 8 bits in blocks of 256
("double quantization": ~4.13 bits per weight). Forward dequantizes to the compute dtype; LoRA's A and B
stay fp32 and are the only trainable tensors::

        x ──► dequant(Q4(W0)) ──────────────┐
        │                                   (+) ──► h = deq(W0)·x + s·B·A·x
        └──► dropout ──► A ──► B ──► · s ───┘

``bits: 8`` stores the base as int8 with one fp32 scale per output row (LLM.int8() without outliers)
instead. The quantization kernels are bitsandbytes' (CPU path; measured on an AVX2-only CPU); storing and
dequantizing weights is :mod:`peftkit.methods.quantize`, the 4-bit CPU layer :mod:`peftkit.methods._nf4`, and
handing the memory quantization frees back to the OS :mod:`peftkit.allocator`. This file is the method: its
config, the LoRA layer over a quantized weight, replacing the base's layers, and attaching.

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

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.allocator import file_backed, release_file_pages, trim_heap
from peftkit.core.config import ConfigError, check
from peftkit.core.inject import replace_module
from peftkit.core.registry import register
from peftkit.core.targeting import find_targets
from peftkit.methods.lora import LoraConfig, LoraLinear, attach_lora
from peftkit.methods.quantize import (
    LowPrecisionLinear,
    dequantize_linear,
    is_quantized,
    quantize_linear,
    quantized_bytes,
)


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


def quantize_base(model: nn.Module, config: QLoraConfig,
                  materialize: Callable[[str, nn.Linear], None] | None = None) -> list[str]:
    """Replace every linear layer except the output head (unless ``quantize_head``) by its quantized copy;
    store the other large frozen weights in ``base_dtype``. Returns the quantized layers' names.

    Layers are quantized one at a time, and the fp32 pages of a weight read from a memory-mapped
    checkpoint are handed back to the OS as soon as its quantized copy exists
    (:func:`peftkit.allocator.release_file_pages`): the whole fp32 checkpoint is never resident at once.

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
    names = [n for n in names if not _kept_in_fp32(model, n)]
    head = _head_name(model) if config.quantize_head else None
    if head is not None and head not in names:
        names.append(head)
    for name in names:
        _quantize_layer(model, name, name == head, config, materialize)
    if config.base_dtype == "bf16":
        _store_in_bf16(model)
    _own_storage(model)
    trim_heap()
    return names


def _kept_in_fp32(model: nn.Module, name: str) -> bool:
    """A layer the model class asks to keep in fp32 (transformers' ``_keep_in_fp32_modules``: T5's ``wo``, whose
    forward casts its input to the weight's dtype); transformers' bitsandbytes loading leaves these unquantized too."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []  # a transformers class attribute, None on most
    return any(part in keep for part in name.split("."))


def _quantize_layer(model: nn.Module, name: str, is_head: bool, config: QLoraConfig,
                    materialize: Callable[[str, nn.Linear], None] | None) -> None:
    """Replace layer ``name`` by its quantized copy (see :func:`quantize_base`); a meta weight without
    ``materialize`` is only marked with the bytes it would store."""
    module = model.get_submodule(name)
    base = getattr(module, "base_layer", module)  # find_targets names a wrapped layer by its wrapper
    if type(base).__name__ == "Conv1D":
        raise ConfigError(f"QLoRA quantizes nn.Linear layers; {name!r} is a GPT-2 Conv1D (use lora for this model)")
    if is_quantized(base):
        _check_same_quantization(name, base, config)
        return
    if base is not module:
        raise ConfigError(f"module {name!r} is a {type(module).__name__} around an unquantized layer (an fp32 "
                          "adapter, or a merged one): QLoRA cannot quantize under it; inject QLoRA first")
    shared = is_head and _tied_to_input(model, module)
    if is_head:
        module = _own_linear(module)  # a tied head gets a weight of its own: the embedding stays as it is
    if module.weight.is_meta and materialize is not None:
        module = module.to_empty(device="cpu")
        materialize(name, module)
    if module.weight.is_meta:
        module.weight.peftkit_stored_bytes = quantized_bytes(module.weight.numel(), config.bits,
                                                             config.double_quant, module.out_features)
        module.weight.peftkit_quant_bits = config.bits
        return
    weight = module.weight
    replace_module(model, name, quantize_linear(module, config.bits, config.quant_type, config.double_quant))
    del module
    if not shared:  # the embedding still reads a tied head's pages
        release_file_pages(weight)


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
            release_file_pages(old)
            del old
            emb.register_forward_hook(_embedding_output_fp32)
        if type(head) is nn.Linear:  # the whole base is frozen under QLoRA
            if head.weight.dtype == torch.float32:
                old = head.weight.data
                head.weight.data = old.to(torch.bfloat16)
                release_file_pages(old)
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
                if p is not None and p.device.type == "cpu" and not p.is_meta and file_backed(p):
                    old = p.data
                    p.data = old.clone()
                    release_file_pages(old)
                    del old


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


__all__ = ["QLoraConfig", "QLoraLinear", "load_qlora_adapter", "quantize_base"]
