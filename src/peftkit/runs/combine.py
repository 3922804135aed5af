"""``peftkit merge`` with several adapters: load the base and the source folders, combine, write one folder.

The checks and the algebra are the library's (:mod:`peftkit.core.combine`, :mod:`peftkit.methods.lora_combine`);
this is the orchestration around them: refuse a bad output folder and bad options before anything is loaded,
then write the combined adapter (PEFT format) or a standalone model with it merged, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.core.adapter import set_active
from peftkit.core.combine import SignMethod, check_adapter_files, check_options, load_sources
from peftkit.core.files import refuse_overlap
from peftkit.core.inject import unload
from peftkit.core.io import save_adapter
from peftkit.errors import ConfigError
from peftkit.methods.lora_combine import combine_adapters
from peftkit.runs.export import DTYPES, save_model_folder


def combine_to_folder(
    model_name: str,
    adapters: list[str | os.PathLike],
    out: str | os.PathLike,
    weights: list[float] | None = None,
    combination: str = "cat",
    density: float | None = None,
    rank: int | None = None,
    majority_sign_method: SignMethod = "total",
    seed: int = 0,
    into_base: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
    strict_base: bool = False,
) -> Path:
    """Combine adapter folders on base ``model_name`` and write the result to ``out`` atomically.

    Args:
        weights: one per adapter; default all 1 (the sum: what stacking the adapters gives).
        into_base: write a standalone model with the combined adapter merged (loads with transformers alone)
            instead of the combined adapter (a PEFT-format folder).
        dtype: parameter dtype of the standalone model (``into_base``).
        overwrite: replace a non-empty ``out``.
        strict_base: refuse an adapter recorded as trained on other base weights than ``model_name`` (default: warn).
        Others: as :func:`peftkit.methods.lora_combine.combine_adapters`.

    Raises:
        ConfigError: ``out`` exists and is not empty (without ``overwrite``), or a bad argument.
        AdapterFileError: a source folder cannot be combined (see :func:`peftkit.core.combine.check_adapter_files`).
    """
    from peftkit.models import load_model

    out = Path(out)
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    _check_before_loading(model_name, adapters, out, overwrite, dtype)
    check_options(len(adapters), weights, combination, density, rank, majority_sign_method)
    check_adapter_files(adapters)  # before loading the base: fail fast
    model, tok = load_model(model_name)
    names = load_sources(model, adapters, strict_base)
    new_name = "combined"
    while new_name in names:
        new_name += "_"
    combine_adapters(model, names, weights, combination, new_name, density, rank, majority_sign_method, seed)
    if not into_base:
        return save_adapter(model, out, new_name)
    set_active(model, new_name)
    return save_model_folder(unload(model, merge=True).to(DTYPES[dtype]), tok, out)


def _check_before_loading(model_name: str, adapters: list[str | os.PathLike], out: Path, overwrite: bool,
                          dtype: str) -> None:
    """ConfigError for an output folder that would overwrite a source or hold other files, or an unknown dtype."""
    for adapter in adapters:
        refuse_overlap(out, {"--adapter": adapter})
    if Path(model_name).is_dir():
        refuse_overlap(out, {"--model": model_name})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


__all__ = ["combine_to_folder"]
