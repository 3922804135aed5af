"""Adapters on the tiny Llama (real SmolLM2 tokenizer) to export, and readers for the GGUF files written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from peftkit import inject, save_adapter
from peftkit.core.config import MethodConfig
from peftkit.models import load_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def make_adapter(tiny_lm_dir: Path, tmp_path: Path):
    """``make_adapter(config) -> adapter folder``: ``config`` attached to the tiny model with random weights
    everywhere (B too), saved."""
    count = [0]

    def make(config: MethodConfig) -> Path:
        torch.manual_seed(1)
        model, tok = load_model(str(tiny_lm_dir))
        inject(model, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_magnitude" not in name:
                    p.add_(torch.randn_like(p) * 0.3)
        count[0] += 1
        out = tmp_path / f"adapter{count[0]}"
        save_adapter(model, out)
        return out

    return make


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields {key: value}, tensors {name: (type name, float32 array in PyTorch (out, in) order)})``."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    fields.update({k: f.contents() for k, f in reader.fields.items()
                   if k in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id")})
    tensors = {}
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists ne[0] (the row length) first
        tensors[t.name] = (t.tensor_type.name, data.reshape(shape))
    return fields, tensors
