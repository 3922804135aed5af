"""``peftkit info``: what is available, and what a config would train (without training)."""

from __future__ import annotations

import torch


def describe(config: str | None = None, overrides: list[str] = ()) -> str:
    from peftkit.core.registry import get_method, list_methods
    from peftkit.data.builtin import BUILTIN_DATASETS
    from peftkit.models import list_builtin_models

    lines = ["methods:"]
    lines += [f"  {name:16s} {summary} [default lr {get_method(name).config_cls.default_lr:g}]"
              for name, summary in list_methods().items()]
    lines += ["built-in models:"] + [f"  {k:16s} {v}" for k, v in list_builtin_models().items()]
    lines += ["built-in datasets:"] + [f"  {k:16s} {v}" for k, v in BUILTIN_DATASETS.items()]
    from peftkit.allocator import describe as allocator_line

    lines.append(allocator_line())
    if config is not None or overrides:
        lines.append(count_for_config(config, overrides))
    return "\n".join(lines)


def count_for_config(config: str | None, overrides: list[str] = ()) -> str:
    """Trainable / total parameters of the config's model + method, built on the meta device (no weights)."""
    from transformers import AutoConfig

    from peftkit.core.adapter import count_parameters
    from peftkit.models import resolve_model
    from peftkit.runs.config import load_config

    cfg = load_config(config, overrides)
    hf_config = AutoConfig.from_pretrained(resolve_model(cfg.model), local_files_only=True)
    from peftkit.runs.task_types import model_from_config

    with torch.device("meta"):
        model = model_from_config(cfg, hf_config)  # the run's task class (a seq_cls head trains too)
    return f"{cfg.model} + {cfg.method_config().method_name}: {count_parameters(model)}"
