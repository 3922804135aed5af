"""Typed, validated configs: the base every method config derives from, and dict <-> dataclass helpers.

YAML/JSON is how configs are stored and edited; these dataclasses are the single source of truth.
Unknown keys are errors that suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from peftkit.core.registry import get_method
from peftkit.errors import ConfigError

T = TypeVar("T")


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with the field named.

    Nested dataclass fields are built recursively; ``where`` is the dotted prefix used in messages.
    """
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(key, sorted(fields), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain dicts/lists (for YAML/JSON)."""
    return dataclasses.asdict(obj)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (ints widen to floats; nested dataclasses are built)."""
    if hint is MethodConfig:  # which config class depends on the method named
        return method_from_dict(value, where)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(hint, value, where + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where} has the wrong type: got {value!r}, expected {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "2e-4" as a string
        except ValueError:
            pass
    if isinstance(hint, type):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclass
class MethodConfig:
    """Base of every method's config. ``method_name`` is set by the registry decorator.

    What a method *is* is declared here with the default every method gets, and overridden on the method's
    config where it differs; generic code asks these, never ``getattr(config, "x", default)``.
    """

    method_name: ClassVar[str] = ""
    #: PEFT's ``peft_type`` for methods whose files PEFT can read; None otherwise.
    peft_type: ClassVar[str | None] = None
    #: the learning rate ``train.lr`` defaults to for this method (measured on SmolLM2-135M, docs/methods.md)
    default_lr: ClassVar[float] = 2e-4
    #: the method trains base parameters themselves (no adapter layers): there is no separate adapter to turn
    #: off, unload without merging, or give only some batch rows
    in_place: ClassVar[bool] = False
    #: a run delivers a whole model folder (``save_pretrained``) rather than an adapter (full fine-tuning)
    writes_full_model: ClassVar[bool] = False
    #: which base biases train with the adapter: "none", "all", "lora_only" (a field on methods offering it)
    bias: ClassVar[str] = "none"
    #: base modules trained fully and saved with the adapter (a field on methods that can carry them)
    modules_to_save: ClassVar[list[str] | None] = None
    #: soft prompts: where the virtual tokens go, "embeddings" (before the input: the sequence grows) or
    #: "prefix" (each layer's keys and values only); None for methods without virtual tokens
    virtual_token_kind: ClassVar[str | None] = None
    #: adapters of this method combine into one (``peftkit merge`` with several adapters): each adds a plain
    #: low-rank weight delta (LoRA, QLoRA; methods/lora_combine.py). False for every other method.
    combinable: ClassVar[bool] = False

    @property
    def virtual_tokens(self) -> int:
        """Virtual tokens the adapter adds to every sequence (soft prompts); 0 for other methods."""
        return 0

    def trains_base_tensors(self) -> bool:
        """Does this adapter change base tensors (in place, biases, or ``modules_to_save``)?

        Such an adapter's effect is shared by everything using the base: it cannot serve some batch rows only,
        and no weight delta describes it.
        """
        return self.in_place or self.bias != "none" or bool(self.modules_to_save)

    def trainable_base_parameters(self, model: Any) -> Iterator[tuple[str, Any]]:
        """``(name, parameter)`` of the base parameters an in-place method trains (none for other methods)."""
        return iter(())

    def __post_init__(self) -> None:
        self.validate()  # a method's own range checks word their messages best
        for f in dataclasses.fields(self):  # NaN passes every range check (NaN compares False): refuse what is left
            _check_finite(getattr(self, f.name), f"method.{f.name}")

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.method_name, **to_dict(self)}

    # -- adapter files (peftkit.core.io) -------------------------------------------------------------
    def to_file(self, model: Any, adapter_name: str, tensors: dict[str, Any]) -> dict[str, Any]:
        """The tensors written to the adapter file, given the adapter's parameters under their file keys.

        Default: the parameters themselves. Methods whose files are laid out otherwise override it (soft
        prompts: PEFT's single ``prompt_embeddings`` tensor, computed from the parameters).
        """
        return tensors

    def from_file(self, model: Any, adapter_name: str, tensors: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`to_file` on load: a file's tensors under the adapter's parameter file keys.

        It may reshape the freshly attached adapter to fit the file (a P-tuning file holds the encoder's output,
        so the encoder becomes a plain table). Raises AdapterFileError for tensors that do not fit.
        """
        return tensors


def method_from_dict(spec: Any, where: str = "method") -> MethodConfig:
    """The config of the method ``spec["name"]`` names, built from the rest of ``spec`` (``{name: lora, r: 8}``).

    Raises:
        ConfigError: ``spec`` is no mapping, names no method or an unknown one, or has a bad field (named).
    """
    if isinstance(spec, MethodConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name is missing: name the method, e.g. {where}.name=lora (see `peftkit info`)")
    return from_dict(get_method(name).config_cls, spec, f"{where}.")


@dataclass
class TargetedConfig(MethodConfig):
    """Fields of methods that wrap chosen modules (LoRA and friends).

    Attributes:
        target_modules: names or suffixes (``["q_proj", "v_proj"]``), a regex string matched against the whole
            module name, or ``"all-linear"``. None: the usual attention projections for the model's family.
        exclude: modules to leave alone, same rules as ``target_modules``.
        layers: only adapt modules inside these transformer-block indices.
        modules_to_save: extra base modules trained fully and saved with the adapter (e.g. a classifier head).
            One tied to another module (an LM head tied to the input embeddings) gets a copy of its own, as in
            PEFT: the adapter's head replaces the head only, the input embeddings stay the base's.
    """

    target_modules: list[str] | str | None = None
    exclude: list[str] | str | None = None
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}[{k!r}]")


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


__all__ = ["ConfigError", "MethodConfig", "TargetedConfig", "check", "field", "from_dict", "method_from_dict", "to_dict"]
