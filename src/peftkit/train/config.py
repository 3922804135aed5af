"""The run config: what ``peftkit train CONFIG.yaml key=value ...`` reads.

Typed dataclasses, validated on construction; YAML is only how they are stored. Every field can be
overridden with dotted ``key=value`` pairs (values are read as YAML: ``train.lr=1e-4``, ``method.target_modules=[q_proj]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peftkit.core.config import MethodConfig, check, from_dict, to_dict
from peftkit.core.registry import get_method
from peftkit.errors import ConfigError


@dataclass
class DataConfig:
    """Attributes:
        train: built-in dataset name (``rotten-tomatoes``, ``chatterbot``) or a file (.jsonl/.json/.csv/.parquet).
        validation: a file for the validation split; default: the built-in split, or ``validation_fraction`` of train.
        test: a file for the test split (built-ins have their own).
        format: ``auto`` (detect from the fields), ``alpaca``, ``chat``, ``prompt_completion`` or ``text``.
        template: ``auto`` (the tokenizer's chat template if it has one, else alpaca), ``chat``, ``alpaca`` or ``none``.
        max_length: examples longer than this many tokens are truncated (and counted).
        train_on_prompt: compute the loss on prompt tokens too (default: response tokens only).
        packing: pack several examples per row, attention kept inside each example.
        group_by_length: batch examples of similar length together (less padding).
        max_train_examples: use at most this many training examples (after shuffling with the seed).
        validation_fraction: held out from ``train`` when a file has no validation split.
        max_validation_examples: cap the validation split used for eval loss.
    """

    train: str = "rotten-tomatoes"
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = "auto"
    template: Literal["auto", "chat", "alpaca", "none"] = "auto"
    max_length: int = 256
    train_on_prompt: bool = False
    packing: bool = False
    group_by_length: bool = True
    max_train_examples: int | None = None
    validation_fraction: float = 0.05
    max_validation_examples: int | None = 200

    def __post_init__(self) -> None:
        check(self.max_length >= 8, f"data.max_length must be >= 8, got {self.max_length}")
        check(0.0 <= self.validation_fraction < 1.0, f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        check(self.max_train_examples is None or self.max_train_examples > 0, "data.max_train_examples must be positive")


@dataclass
class TrainConfig:
    """Attributes:
        max_steps: optimizer steps to run.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size x grad_accum).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        schedule: ``cosine``, ``linear`` (decay to 0) or ``constant``, after warmup.
        warmup_steps: linear warmup from 0.
        max_grad_norm: clip the gradient norm to this (0 disables clipping).
        seed: seeds data order, adapter init and dropout.
        eval_every: validation loss every N steps (0: only at the end).
        save_every: checkpoint every N steps (0: none).
        keep_checkpoints: how many recent checkpoints to keep.
        log_every: write metrics every N steps.
        precision: ``fp32``, or ``bf16`` autocast (adapter weights stay fp32).
        gradient_checkpointing: recompute activations in backward to save memory.
        threads: torch CPU threads (default: torch's choice).
        distributed: ``auto`` (DDP when started by torchrun with several processes, else one process),
            ``none``, ``ddp``, or ``fsdp`` (shard the model over ranks: for models that do not fit one
            device). ``batch_size`` is per rank: effective batch = batch_size x ranks x grad_accum.
        on_nan: a NaN/inf loss or gradient norm: ``stop`` (naming the step and the last good checkpoint)
            or ``skip`` the batch (gives up after 10 bad steps in a row).
    """

    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    threads: int | None = None
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    on_nan: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        check(self.threads is None or self.threads > 0, f"train.threads must be > 0, got {self.threads}")
        for name in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        check(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"train.{name} must be a finite number >= 0, got {value}")
        check(self.threads is None or self.threads <= 4096, f"train.threads must be <= 4096, got {self.threads}")


@dataclass
class RunConfig:
    """Attributes:
        model: built-in alias (``smollm2-135m``, ``minilm-l6``) or a local Hugging Face model folder.
        method: the method's settings, ``{name: lora, r: 8, ...}`` (see ``peftkit info``).
        data: what to train and evaluate on.
        train: optimisation settings.
        output_dir: where the run writes; the final adapter goes to OUTPUT_DIR/adapter (PEFT format).
        overwrite: allow replacing a finished run in output_dir.
        trust_remote_code: let transformers run Python code shipped in the model folder (off: such a
            model is refused). Only for folders you trust.
    """

    model: str = "smollm2-135m"
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/demo"
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "output_dir"):
            value = getattr(self, name)
            check(bool(value.strip()), f"{name} must not be empty")
            check("\0" not in value, f"{name} must not contain a NUL character")
        for name in ("train", "validation", "test"):
            value = getattr(self.data, name)
            check(value is None or (bool(value.strip()) and "\0" not in value),
                  f"data.{name} must be a non-empty path or dataset name without NUL characters")

    def method_config(self) -> MethodConfig:
        """The typed config of the chosen method (validated)."""
        return build_method_config(self.method)

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["method"] = self.method_config().to_dict()
        return d


def build_method_config(spec: dict[str, Any]) -> MethodConfig:
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("method.name is missing: name the method, e.g. method.name=lora (see `peftkit info`)")
    return from_dict(get_method(name).config_cls, spec, "method.")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigError: missing/unparsable file, unknown key (with the closest known one), bad value.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    data.setdefault("method", {"name": "lora"})
    for item in overrides:
        apply_override(data, item)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    _check_keys(data)
    try:
        cfg = from_dict(RunConfig, data)
        cfg.method_config()  # validate the method section now
    except RecursionError:
        raise ConfigError("config nested too deeply") from None
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every way it can be wrong is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections (model, method, data, train, ...)")
    return data


def _check_keys(node: Any, where: str = "", depth: int = 0, seen: set[int] | None = None) -> None:
    """Every mapping key in the config must be a string (YAML also allows numbers, lists, null...).

    YAML anchors can make shared or cyclic structures ("billion laughs"): each container is visited once.
    """
    seen = set() if seen is None else seen
    if not isinstance(node, (dict, list)) or id(node) in seen:
        return
    seen.add(id(node))
    if depth > 50:
        raise ConfigError(f"config nested too deeply at {where or 'top level'}")
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(node, dict) and not isinstance(key, str):
            raise ConfigError(f"config key {key!r} in {where.rstrip('.') or 'the top level'} must be a string")
        _check_keys(value, f"{where}{key}." if isinstance(node, dict) else f"{where}[{key}].", depth + 1, seen)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key!r}: value nested too deeply") from None
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if part == "method" and isinstance(node.get("method"), str):
            node["method"] = {"name": node["method"]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value  # unknown keys are reported (with the closest known one) when the config is built


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["DataConfig", "RunConfig", "TrainConfig", "apply_override", "build_method_config", "dump_config", "load_config"]
