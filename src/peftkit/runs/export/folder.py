"""Writing a merged, standalone Hugging Face model folder (loads with plain transformers, no peftkit)."""

from __future__ import annotations

from pathlib import Path

import torch

from peftkit.core.files import atomic_dir, refuse_overlap
from peftkit.core.inject import unload
from peftkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_model_folder(model: torch.nn.Module, tokenizer: object, out: str | Path) -> Path:
    """``save_pretrained`` of the model and its tokenizer, atomically (an existing folder is replaced on success)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def merge_to_folder(model_name: str, adapter: str, out: str | Path, dtype: str = "fp32", overwrite: bool = False,
                    strict_base: bool = False) -> Path:
    """Load ``model_name`` + ``adapter``, fold the adapter into the weights and save the result atomically.

    ``strict_base``: refuse an adapter recorded as trained on other base weights (default: warn).
    """
    from peftkit.eval.scoring import load_model_with_adapter

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    refuse_overlap(out, {"--adapter": adapter, **({"--model": model_name} if Path(model_name).is_dir() else {})})
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    model, tok = load_model_with_adapter(model_name, adapter, strict_base)
    return save_model_folder(unload(model, merge=True).to(DTYPES[dtype]), tok, out)
