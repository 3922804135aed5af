"""The method registry: a dict and a decorator.

A method is a config dataclass plus a function that attaches it to a built model. Config files and
the CLI name methods by their registry key (``method.name: lora``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: registry key, e.g. ``"lora"``.
        config_cls: the method's config dataclass.
        attach: ``attach(model, config, adapter_name) -> None`` wraps the model's modules in place.
        summary: one line for ``peftkit info``.
    """

    name: str
    config_cls: type
    attach: Callable[[nn.Module, Any, str], None]
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, summary: str) -> Callable:
    """Decorator registering ``attach`` under ``name``; names must be unique."""

    def deco(attach: Callable[[nn.Module, Any, str], None]) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(name, config_cls, attach, summary)
        config_cls.method_name = name
        return attach

    return deco


def get_method(name: str) -> Method:
    """The method registered as ``name``; a clear error listing known names otherwise."""
    _load_builtin_methods()
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        from peftkit.errors import ConfigError

        raise ConfigError(f"unknown method {name!r}{hint}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> dict[str, str]:
    """Registered method names with their one-line summaries."""
    _load_builtin_methods()
    return {name: m.summary for name, m in sorted(METHODS.items())}


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method (each file registers itself).
    import peftkit.methods  # noqa: F401
