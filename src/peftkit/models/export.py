"""Writing a merged, standalone Hugging Face model folder (loads with plain transformers, no peftkit)."""

from __future__ import annotations

from pathlib import Path

import torch

from peftkit.core.files import atomic_dir
from peftkit.core.inject import unload
from peftkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge_to_folder(model_name: str, adapter: str, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Load ``model_name`` + ``adapter``, fold the adapter into the weights and save the result atomically."""
    from peftkit.eval.tasks import load_model_with_adapter

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    model, tok = load_model_with_adapter(model_name, adapter)
    merged = unload(model, merge=True).to(DTYPES[dtype])
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
