"""``peftkit export --format gguf``: which file an adapter becomes, and the output folder written in one piece.

Routes:

* a LoRA / QLoRA adapter (``combinable``: a plain s·B·A on linear layers) -> ``adapter.gguf``, a llama.cpp LoRA
  file used over a GGUF of the same base (``--ollama`` also writes that base, ``base.gguf``);
* ``--merge``, and every method a LoRA file cannot express (DoRA, IA3, full and selective fine-tunes, ...) ->
  ``model.gguf``, the merged model; methods that do not merge (soft prompts, bottleneck adapters, LLaMA-Adapter)
  are refused with the reason;
* ``--model`` alone -> ``model.gguf``, the base itself (to pair with a LoRA file).

The folder is written beside its final place and renamed into it when complete: an existing folder is replaced
only with ``overwrite`` and never left half-written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftkit.core.files import atomic_dir, refuse_overlap
from peftkit.errors import ConfigError
from peftkit.runs.export.gguf_model import check_dtype, write_model_gguf

MODEL_FILE, ADAPTER_FILE, BASE_FILE, MODELFILE = "model.gguf", "adapter.gguf", "base.gguf", "Modelfile"


@dataclass
class ExportResult:
    """What was written: ``files`` (names in ``out``), ``route`` ("lora", "merged" or "base"), ``notes``."""

    out: Path
    route: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_gguf(model_name: str, adapter: str | None, out: str | Path, dtype: str = "f16", merge: bool = False,
                ollama: bool = False, overwrite: bool = False, strict_base: bool = False,
                pre: str | None = None) -> ExportResult:
    """Write ``model_name`` (+ ``adapter``) as GGUF into the folder ``out`` (module docstring).

    Args:
        pre: llama.cpp's pre-tokenizer name; None: the built-in model's own (copied from its GGUF), else "default".

    Raises:
        ConfigError: ``out`` is not empty (without ``overwrite``) or overlaps an input; a model, adapter or tokenizer
            GGUF export does not cover; an adapter whose method cannot be merged.
    """
    from peftkit.models.load import detect_task, load_for_eval

    check_dtype(dtype)
    if adapter and (Path(adapter) / "config.json").is_file() and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is a whole model folder (a full fine-tune), not an adapter: pass it as --model")
    out = Path(out)
    refuse_overlap(out, {**({"--adapter": adapter} if adapter else {}),
                         **({"--model": model_name} if Path(model_name).is_dir() else {})})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    task = detect_task(model_name, adapter)
    if task != "causal_lm":
        raise ConfigError(f"GGUF export covers causal language models; this {'adapter' if adapter else 'model'} is "
                          f"{task}")
    model, tok = load_for_eval(model_name, adapter, strict_base)
    pre = pre or _builtin_pre(model_name)
    result = ExportResult(out, "base")
    name = _display_name(adapter or model_name)
    with atomic_dir(out) as tmp:
        if adapter:
            model = _write_adapter(model, tok, tmp, result, dtype, merge, ollama, name, Path(model_name).name, pre)
        if result.route != "lora":
            write_model_gguf(model, tok, tmp / MODEL_FILE, dtype, name, pre)
            result.files.append(MODEL_FILE)
        if ollama:
            from peftkit.core.files import atomic_write_text
            from peftkit.runs.export.ollama import modelfile

            lora = result.route == "lora"
            context = min(int(model.config.max_position_embeddings), 8192)
            atomic_write_text(tmp / MODELFILE, modelfile(BASE_FILE if lora else MODEL_FILE, tok,
                                                         ADAPTER_FILE if lora else None, context))
            result.files.append(MODELFILE)
    return result


def _write_adapter(model: nn.Module, tok: Any, tmp: Path, result: ExportResult, dtype: str, merge: bool,
                   ollama: bool, name: str, base_name: str, pre: str | None) -> nn.Module:
    """Write the LoRA file (and, for Ollama, the base beside it), or return the merged model for model.gguf."""
    from peftkit.core.adapter import get_state
    from peftkit.core.inject import unload

    adapter_name, config = next(iter(get_state(model).configs.items()))
    if not _lora_route(config, merge):
        if not merge:
            result.notes.append(f"{config.method_name} has no llama.cpp LoRA-file form: writing the merged model")
        result.route = "merged"
        return _merged(model, config)
    from peftkit.runs.export.gguf_lora import write_lora_gguf

    result.route = "lora"
    info = write_lora_gguf(model, adapter_name, tmp / ADAPTER_FILE, dtype, name)
    result.files.append(ADAPTER_FILE)
    if info["folded"]:
        result.notes.append(f"{len(info['folded'])} module(s) scaled otherwise than alpha/r (rsLoRA, rank_pattern, "
                            "alpha_pattern): their scale is folded into lora_b, so the file is exact")
    if ollama:
        write_model_gguf(unload(model, merge=False), tok, tmp / BASE_FILE, dtype, base_name, pre)
        result.files.append(BASE_FILE)
    return model


def _display_name(path: str) -> str:
    """``general.name``: the folder's name, or its run's for a run's ``adapter`` / ``best`` folder."""
    p = Path(path).resolve() if Path(path).exists() else Path(path)
    return p.parent.name if p.name in ("adapter", "best") and p.parent.name else p.name


def _lora_route(config: Any, merge: bool) -> bool:
    """True: write a LoRA file. Raises for a LoRA adapter that changes base tensors, unless merging."""
    if merge or not config.combinable:
        return False
    if config.trains_base_tensors():
        what = "modules_to_save" if config.modules_to_save else f"bias={config.bias!r}"
        raise ConfigError(f"the adapter trains base tensors ({what}), which a llama.cpp LoRA file cannot carry; "
                          "export with --merge for a merged model")
    return True


def _merged(model: nn.Module, config: Any) -> nn.Module:
    from peftkit.core.inject import unload
    from peftkit.errors import NotMergeableError

    try:
        return unload(model, merge=True)
    except NotMergeableError:
        raise ConfigError(f"{config.method_name} cannot be exported as GGUF: what it adds is no change of a weight, "
                          "so it has neither a LoRA-file form nor a merged model; run it with peftkit "
                          "(peftkit chat, peftkit serve)") from None


def _builtin_pre(model_name: str) -> str | None:
    """llama.cpp's pre-tokenizer name recorded in the GGUF a built-in model came from."""
    from peftkit.models.builtin import source_gguf

    source = source_gguf(model_name)  # an alias, or its converted cache folder
    if source is None:
        return None
    import gguf

    field_ = gguf.GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
    return field_.contents() if field_ is not None else None
