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

The adapter file is a plain LoRA file (PEFT's ``peft_type: LORA``): it loads onto the fp32 base with
``load_adapter`` or PEFT, or onto a quantized base with :func:`load_qlora_adapter`. Merging dequantizes
the weight to fp32, adds s·B·A and keeps the fp32 weight (re-quantizing would add a second rounding
error); the merged output equals the unmerged quantized output up to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import os
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


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA settings: every LoRA field, plus how the base is stored.

    Attributes:
        bits: 4 (NF4/FP4, block-wise) or 8 (int8, per output row).
        quant_type: 4-bit data type, ``nf4`` (the paper's) or ``fp4``.
        double_quant: quantize the 4-bit block scales too (saves ~0.37 bits per weight).
        target_modules: LoRA targets; default ``all-linear`` (the paper adapts every linear layer).
    """

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        check(self.bits in (4, 8), f"method.bits must be 4 or 8, got {self.bits!r}")
        check(self.quant_type in ("nf4", "fp4"), f"method.quant_type must be nf4 or fp4, got {self.quant_type!r}")

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
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
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
        return bf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
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


def quantize_base(model: nn.Module, config: QLoraConfig) -> list[str]:
    """Replace every linear layer except the output head by its quantized copy; returns their names.

    On the meta device (``peftkit memory``) nothing can be quantized: the layers stay, and each weight is
    marked with the bytes it would take (``peftkit_stored_bytes``).
    """
    names = find_targets(model, "all-linear", config.exclude, accept=lambda m: isinstance(m, nn.Linear) or
                         type(m).__name__ == "Conv1D")
    for name in names:
        module = model.get_submodule(name)
        if type(module).__name__ == "Conv1D":
            raise ConfigError(f"QLoRA quantizes nn.Linear layers; {name!r} is a GPT-2 Conv1D (use lora for this model)")
        if is_quantized(module):
            continue
        if module.weight.is_meta:
            module.weight.peftkit_stored_bytes = quantized_bytes(module.weight.numel(), config.bits,
                                                                 config.double_quant, module.out_features)
            continue
        replace_module(model, name, quantize_linear(module, config.bits, config.quant_type, config.double_quant))
    _own_storage(model)
    return names


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
                if p is not None and p.device.type == "cpu" and not p.is_meta:
                    p.data = p.data.clone()


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


__all__ = ["QLoraConfig", "QLoraLinear", "dequantize_linear", "dequantize_weight", "load_qlora_adapter",
           "quantize_base", "quantize_linear", "quantized_bytes"]
