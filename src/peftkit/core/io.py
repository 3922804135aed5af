"""Adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.<param>`` with the adapter name removed, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Only safetensors are read or
written: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit.core.adapter import DEFAULT_ADAPTER, adapter_layers, adapter_parameters, get_state
from peftkit.core.files import atomic_dir
from peftkit.core.identity import check_base, write_identity
from peftkit.core.inject import inject
from peftkit.core.registry import METHODS, _load_builtin_methods
from peftkit.errors import AdapterFileError, ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT file keys."""
    config = get_state(model).configs[adapter_name]
    tensors = {PREFIX + k: p for k, p in adapter_parameters(model, adapter_name)}
    return {k: t.detach().cpu().contiguous() for k, t in config.to_file(model, adapter_name, tensors).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Write one adapter as a PEFT folder, atomically (an existing folder is replaced only on success)."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; loaded: {', '.join(state.configs)}")
    config = state.configs[adapter_name]
    peft_config = config.to_peft(model, state.targets[adapter_name])
    peft_config.setdefault("base_model_name_or_path", base_model_name(model))
    peft_config.setdefault("task_type", task_type(model))
    peft_config.setdefault("inference_mode", True)
    peft_config.setdefault("revision", None)
    tensors = adapter_state_dict(model, adapter_name)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        write_identity(tmp, model, adapter_name, peft_config["base_model_name_or_path"])  # peftkit.json: which base
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder, with file-level errors made clear."""
    file = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise AdapterFileError(f"adapter folder not found: {path}")
    if not file.is_file():
        raise AdapterFileError(f"{file}: missing (not an adapter folder?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterFileError(f"{file}: no 'peft_type' field")
    return data


def config_from_peft(data: dict[str, Any]):
    """The peftkit method config for a PEFT ``adapter_config.json`` dict."""
    _load_builtin_methods()
    for method in METHODS.values():
        if method.config_cls.peft_type == data["peft_type"] and method.config_cls.matches_peft(data):
            return method.config_cls.from_peft(data)
    raise AdapterFileError(f"adapter type {data['peft_type']!r} is not supported by peftkit")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    trainable: bool = False,
    strict_base: bool = False,
) -> nn.Module:
    """Attach the adapter stored at ``path`` (peftkit's or PEFT's) and load its weights.

    Args:
        strict_base: refuse an adapter whose recorded base fingerprint (``peftkit.json``) is not this model's;
            by default that only warns (:class:`peftkit.core.identity.BaseMismatchWarning`).

    Raises:
        AdapterFileError: the folder or its files are missing or malformed, its target modules are not in
            the model, or a tensor is missing, unexpected, or of the wrong shape (the first mismatching
            tensor is named); with ``strict_base``, the adapter was trained on another base. On error the
            model is left without the new adapter.
    """
    data = read_adapter_config(path)
    check_base(model, path, base_model_name(model), strict_base)
    try:
        config = config_from_peft(data)
    except (ValueError, TypeError) as e:  # bad values in the file: name the file
        raise AdapterFileError(f"{Path(path) / CONFIG_NAME}: {e}") from None
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise AdapterFileError(f"{weights_file}: missing (only safetensors adapters are loaded)")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{weights_file}: unreadable safetensors file ({e})") from None
    _check_shapes_first(model, config, adapter_name, weights_file)
    try:
        inject(model, config, adapter_name)
    except ConfigError as e:  # e.g. target modules of another architecture
        raise AdapterFileError(f"{path}: the adapter does not fit this model: {e}") from None
    try:
        try:
            tensors = config.from_file(model, adapter_name, tensors)
        except AdapterFileError as e:
            raise AdapterFileError(f"{weights_file}: {e}") from None
        _copy_into(model, adapter_name, tensors, weights_file)
    except AdapterFileError:
        from peftkit.core.inject import delete_adapter, unload

        if len(get_state(model).configs) == 1:
            unload(model)
        else:
            delete_adapter(model, adapter_name)
        raise
    if not trainable:
        for _, p in adapter_parameters(model, adapter_name):
            p.requires_grad_(False)
    return model


def _check_shapes_first(model: nn.Module, config: Any, adapter_name: str, file: Path) -> None:
    """Compare the file's tensor shapes (its header only) with those the config gives the adapter, before anything
    is allocated: a config saying ``r: 1000000000`` must not allocate hundreds of GB before the file is read.

    The config is attached to a copy of the model on the meta device (no memory), whose adapter parameters give the
    expected shapes. Tensors a method stores otherwise than as its parameters (soft prompts) are checked after
    attaching, as before; so is everything when a method cannot attach on the meta device.

    Raises:
        AdapterFileError: naming the first tensor whose shape differs, the expected and the found shape.
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        skeleton = _meta_copy(model)
        with torch.device("meta"):
            inject(skeleton, config, adapter_name)
    except Exception:  # noqa: BLE001 - not attachable here: the real attach reports the reason
        return
    for key, p in adapter_parameters(skeleton, adapter_name):
        key = PREFIX + key
        if key in found and found[key] != tuple(p.shape):
            raise AdapterFileError(f"{file}: tensor {key!r} has shape {found[key]} but the model expects "
                                   f"{tuple(p.shape)} with the settings in {CONFIG_NAME} (adapter made for another "
                                   "model, or a config that does not describe this file?)")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: the structure, no weights."""
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _copy_into(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    params = {PREFIX + k: p for k, p in adapter_parameters(model, adapter_name)}
    optional = {k: p for k, p in _embedding_base_weights(model).items() if k in tensors and k not in params}
    extra = sorted(set(tensors) - set(params) - set(optional))
    if extra:
        raise AdapterFileError(f"{file}: tensor {extra[0]!r} does not belong to this model's adapter "
                               f"({len(extra)} unexpected tensors)")
    params.update(optional)
    for key, p in params.items():
        if key not in tensors:
            raise AdapterFileError(f"{file}: tensor {key!r} is missing")
        t = tensors[key]
        if t.shape != p.shape:
            raise AdapterFileError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but the model expects "
                                   f"{tuple(p.shape)} (adapter made for another model?)")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(p.dtype))


def _embedding_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Whole weights of adapted embeddings, under file keys: PEFT saves them too (``save_embedding_layers``)
    and loads them back into the base, so a PEFT adapter over a resized or trained vocabulary works."""
    return {f"{PREFIX}{name}.base_layer.weight": layer.base_layer.weight
            for name, layer in adapter_layers(model) if isinstance(layer.base_layer, nn.Embedding)}


def base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (None for other modules)."""
    try:
        from transformers.models.auto import modeling_auto as ma
    except ImportError:  # pragma: no cover
        return None
    name = type(model).__name__
    table = {
        "CAUSAL_LM": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "SEQ_CLS": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "SEQ_2_SEQ_LM": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "TOKEN_CLS": ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "FEATURE_EXTRACTION": ma.MODEL_MAPPING_NAMES,
    }
    for task, mapping in table.items():
        if name in set(mapping.values()):
            return task
    return None
