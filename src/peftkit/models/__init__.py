"""Models peftkit knows by name: built-in aliases for small packaged models, and loading helpers."""

from peftkit.models.builtin import (
    BUILTIN_MODELS,
    BuiltinModel,
    cache_dir,
    list_builtin_models,
    load_model,
    resolve_model,
)

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "cache_dir", "list_builtin_models", "load_model", "resolve_model"]
