"""Adapter identity: which base model an adapter was trained on, and whether the model it is loaded onto is it.

Every saved adapter records its base's name (``base_model_name_or_path`` in ``adapter_config.json``, as PEFT
does) and a fingerprint of the base weights, in a sidecar file ``peftkit.json`` next to the PEFT files::

    {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "base_fingerprint": "9f2c...",
     "fingerprint_algorithm": "sha256-sample-v1", "fingerprint_excludes": []}

(Not in ``adapter_config.json``: PEFT loads unknown keys there but warns that the file comes from a newer PEFT
and should be upgraded, which would be false. PEFT ignores the sidecar.)

The fingerprint is a sha256 over the base parameters sorted by name: each one's name (with the adapter
wrappers' ``.base_layer`` removed), shape, and 256 of its values (8 evenly spread runs of 32) rounded to
bfloat16 -- except the values of the parameters the adapter trains in place (``fingerprint_excludes``: its
``modules_to_save`` such as a new classification head, trained biases, or the selection of an in-place method),
whose names and shapes count but whose values are the adapter's, not the base's. So it is:

- fast: 256 values per tensor, never a full pass (~10 ms on SmolLM2-135M, ~0.1 s on first touch of a
  memory-mapped checkpoint);
- blind to adapters: their parameters are skipped and wrapped names unwrapped, so attaching, detaching,
  merging, saving and loading adapters leave it unchanged;
- the same for a checkpoint loaded in fp32 or bf16 (values compared at bf16 precision);
- different for another model, another fine-tune of the same architecture, or a base changed anywhere it
  samples (a sample, not a checksum: a change confined to unsampled entries goes unseen).

The per-parameter samples are taken when the first adapter is attached (``inject``) and kept in
``model.peftkit_state``, so the fingerprint describes the base *under* the adapters even after they are merged
or a QLoRA base is quantized. For in-place methods (selective, BitFit, linear probing, full fine-tuning) it
covers the frozen parameters only: the file carries the trained ones, so any base that agrees on the rest is
right (for full fine-tuning that leaves names and shapes: the architecture). Weights changed by hand after
``inject`` are not noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.adapter import STATE_ATTR, _extra_trainable, adapter_layers, get_state
from peftkit.errors import AdapterFileError

SIDECAR_NAME = "peftkit.json"
ALGORITHM = "sha256-sample-v1"
CHUNKS, CHUNK = 8, 32  # values sampled per tensor: 8 runs of 32

#: normalized parameter name -> (shape, sha256 of its sampled values)
Samples = dict[str, tuple[tuple[int, ...], str]]


class BaseMismatchWarning(UserWarning):
    """An adapter is loaded onto a base model other than the one it was trained on."""


# -- the fingerprint ----------------------------------------------------------------------------------------


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name without .base_layer, parameter)`` for every parameter that is not an adapter's, sorted by name."""
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for a in layer.adapter_names()
                   for _, p in layer.adapter_named_parameters(a)}
    params = [(_unwrapped(name), p) for name, p in model.named_parameters() if id(p) not in adapter_ids]
    return sorted(params, key=lambda item: item[0])


def param_samples(model: nn.Module) -> Samples | None:
    """Each base parameter's shape and a digest of its sampled values; None on the meta device."""
    params = base_parameters(model)
    if any(p.is_meta for _, p in params):
        return None
    values = [_sample(p) for _, p in params]
    raw = torch.cat(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes() if values else b""
    samples: Samples = {}
    offset = 0
    for (name, p), v in zip(params, values):
        size = 2 * v.numel()  # bytes of bf16
        samples[name] = (tuple(p.shape), hashlib.sha256(raw[offset:offset + size]).hexdigest())
        offset += size
    return samples


def fingerprint(samples: Samples, excludes: Iterable[str] = ()) -> str:
    """sha256 over every parameter's name and shape, and the sampled values of those not in ``excludes``."""
    skip = set(excludes)
    digest = hashlib.sha256(f"{ALGORITHM}\n".encode())
    for name in sorted(samples):
        shape, values = samples[name]
        digest.update(f"{name}:{shape}:{'-' if name in skip else values}\n".encode())
    return digest.hexdigest()


def base_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of ``model``'s current base weights (adapter parameters excluded); None on the meta device.

    For the base under attached adapters (as it was when the first one was attached) use :func:`model_fingerprint`.
    """
    samples = param_samples(model)
    return None if samples is None else fingerprint(samples)


def recorded_samples(model: nn.Module) -> Samples | None:
    """The samples taken when the first adapter was attached, else those of the current weights."""
    recorded = getattr(getattr(model, STATE_ATTR, None), "base_samples", None)
    return recorded if recorded is not None else param_samples(model)


def model_fingerprint(model: nn.Module, excludes: Iterable[str] = ()) -> str | None:
    """The fingerprint of the base under ``model``'s adapters (see :func:`recorded_samples`)."""
    samples = recorded_samples(model)
    return None if samples is None else fingerprint(samples, excludes)


def trained_in_place(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the base parameters that adapter trains in place (its file holds them), as in the samples."""
    ids = {id(p) for _, p in _extra_trainable(model, get_state(model).configs[adapter_name])}
    return sorted(name for name, p in base_parameters(model) if id(p) in ids)


def _unwrapped(name: str) -> str:
    # q_proj.base_layer.weight (wrapped by an adapter layer) -> q_proj.weight (the plain model's name)
    return re.sub(r"\.base_layer(?=\.)", "", name)


def _sample(p: torch.Tensor) -> torch.Tensor:
    """CHUNKS runs of CHUNK consecutive values, evenly spread over the tensor (all values of small ones), (n,) fp32.

    Runs rather than single strided values: a few memory pages per tensor, not one per value (weights loaded
    from a memory-mapped checkpoint are read from disk on first touch).
    """
    flat = p.detach().reshape(-1)  # a view for contiguous tensors
    if flat.numel() > CHUNKS * CHUNK:
        step = (flat.numel() - CHUNK) // (CHUNKS - 1)
        flat = flat.as_strided((CHUNKS, CHUNK), (step, 1)).reshape(-1)  # (CHUNKS * CHUNK,)
    return flat.to(device="cpu", dtype=torch.float32)


# -- the sidecar file -------------------------------------------------------------------------------------


def identity_record(model: nn.Module, adapter_name: str, base_name: str | None) -> dict[str, Any]:
    """What ``peftkit.json`` holds for adapter ``adapter_name`` of ``model``."""
    excludes = trained_in_place(model, adapter_name)
    return {"base_model_name_or_path": base_name, "base_fingerprint": model_fingerprint(model, excludes),
            "fingerprint_algorithm": ALGORITHM, "fingerprint_excludes": excludes}


def write_identity(folder: Path, model: nn.Module, adapter_name: str, base_name: str | None) -> None:
    record = identity_record(model, adapter_name, base_name)
    (folder / SIDECAR_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_identity(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's recorded base (the fields above; ``{}`` for adapters saved without one, e.g. by PEFT).

    Raises:
        AdapterFileError: ``peftkit.json`` exists but is not a JSON object.
    """
    file = Path(path) / SIDECAR_NAME
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object")
    return data


def check_base(model: nn.Module, path: str | os.PathLike, current_name: str | None, strict: bool = False) -> None:
    """Compare the adapter's recorded base fingerprint with ``model``'s: warn, or refuse when ``strict``.

    Nothing is checked when the adapter records no fingerprint (PEFT's adapters, older files) or one made by
    another algorithm, or when the model's cannot be computed (meta device).

    Raises:
        AdapterFileError: ``strict`` and the fingerprints differ.
    """
    recorded = read_identity(path)
    theirs, excludes = recorded.get("base_fingerprint"), recorded.get("fingerprint_excludes") or []
    if not isinstance(theirs, str) or recorded.get("fingerprint_algorithm") != ALGORITHM:
        return
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise AdapterFileError(f"{Path(path) / SIDECAR_NAME}: fingerprint_excludes must be a list of parameter names")
    ours = model_fingerprint(model, excludes)
    if ours is None or ours == theirs:
        return
    message = (f"{path}: the adapter was trained on base {recorded.get('base_model_name_or_path')!r} (fingerprint "
               f"{theirs[:12]}) but is loaded onto {current_name!r} (fingerprint {ours[:12]}): different weights")
    if strict:
        raise AdapterFileError(message)
    warnings.warn(message + " (strict_base=True or --strict-base refuses)", BaseMismatchWarning, stacklevel=3)
