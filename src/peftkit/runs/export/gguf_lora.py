r"""A LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli --lora``, Ollama's ``ADAPTER``, llama-cpp-python's
``lora_path``), applied at load time over a GGUF of the same base weights.

llama.cpp adds, for each adapted weight W (out x in)::

    W·x + (alpha_file / r)·B·(A·x)       A: ``blk.N.<name>.weight.lora_a`` (r x in), B: ``...lora_b`` (out x r)

with one ``adapter.lora.alpha`` for the whole file and r read from each B. peftkit's scale s = alpha / r per module
(rsLoRA: alpha / sqrt(r); ``rank_pattern`` / ``alpha_pattern``: per module), so a file is exact when
alpha_file = s·r for every module; where the modules disagree, the common value is written and each other module's
ratio s·r / alpha_file is folded into its B. (llama.cpp's own ``convert_lora_to_gguf.py`` writes ``lora_alpha`` as it
is: an rsLoRA adapter then acts at 1/sqrt(r) of its strength.) B of q and k gets llama.cpp's RoPE row order
(by heads for q, by key/value heads for k), as the base's q and k do.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.adapter import adapter_layers
from peftkit.errors import ConfigError
from peftkit.runs.export.gguf_model import Layout, add_tensor, check_dtype

INNER = ".base_layer"  # an adapter layer's wrapped module: the base weight's own name has no such part


def lora_factors(model: nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{base weight name: (A (r, in), B (out, r), scale)}`` of every module ``adapter`` adapts with LoRA.

    Raises:
        ConfigError: an adapted module has no LoRA-file form (an embedding or head, a non-LoRA layer); the
            message suggests ``--merge``.
    """
    from peftkit.methods.lora import LoraLinear

    out = {}
    for name, layer in adapter_layers(model):
        if adapter not in layer.adapter_names():
            continue
        if not isinstance(layer, LoraLinear) or layer.fan_in_fan_out:
            raise ConfigError(f"module {name!r} ({type(layer.base_layer).__name__}) has no form in a llama.cpp LoRA "
                              "file (linear layers only); export with --merge for a merged model instead")
        a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        out[f"{name}.weight"] = (a.float(), b.float(), float(layer.scaling[adapter]))
    if not out:
        raise ConfigError(f"adapter {adapter!r} adapts no linear layer with LoRA: nothing to write to a LoRA file")
    return out


def file_alpha(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """The one ``adapter.lora.alpha`` of the file: the most common s·r (every module's, when they agree)."""
    values = Counter(round(scale * a.shape[0], 9) for a, _, scale in factors.values())
    return values.most_common(1)[0][0]


def write_lora_gguf(model: nn.Module, adapter: str, path: str | Path, dtype: str = "f16",
                    name: str = "") -> dict[str, Any]:
    """Write ``adapter`` (LoRA layers on ``model``) as a llama.cpp LoRA GGUF.

    Returns:
        ``{"tensors": count, "alpha": alpha_file, "folded": modules whose scale was folded into B}``.
    """
    import gguf

    check_dtype(dtype)
    layout = Layout.of(model.config)
    factors = lora_factors(model, adapter)
    alpha = file_alpha(factors)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    folded = []
    for hf_name, (a, b, scale) in factors.items():
        gname = layout.name(hf_name.replace(INNER, ""))
        ratio = scale * a.shape[0] / alpha
        if abs(ratio - 1.0) > 1e-9:
            b = b * ratio
            folded.append(hf_name)
        add_tensor(writer, f"{gname}.lora_a", a, dtype)  # (r, in)
        add_tensor(writer, f"{gname}.lora_b", layout.to_gguf_rows(gname, b), dtype)  # (out, r)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": 2 * len(factors), "alpha": alpha, "folded": folded}
