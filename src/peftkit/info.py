"""``peftkit info``: what is available, and what a config would train (without training)."""

from __future__ import annotations

import torch


def describe(config: str | None = None, overrides: list[str] = ()) -> str:
    from peftkit.core.registry import list_methods
    from peftkit.data.builtin import BUILTIN_DATASETS
    from peftkit.models import list_builtin_models

    lines = ["methods:"]
    lines += [f"  {name:16s} {summary}" for name, summary in list_methods().items()]
    lines += ["built-in models:"] + [f"  {k:16s} {v}" for k, v in list_builtin_models().items()]
    lines += ["built-in datasets:"] + [f"  {k:16s} {v}" for k, v in BUILTIN_DATASETS.items()]
    if config is not None or overrides:
        lines.append(count_for_config(config, overrides))
    return "\n".join(lines)


def count_for_config(config: str | None, overrides: list[str] = ()) -> str:
    """Trainable / total parameters of the config's model + method, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.core.adapter import count_parameters
    from peftkit.core.inject import inject
    from peftkit.models import resolve_model
    from peftkit.train.config import load_config

    cfg = load_config(config, overrides)
    hf_config = AutoConfig.from_pretrained(resolve_model(cfg.model), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        inject(model, cfg.method_config())
    return f"{cfg.model} + {cfg.method_config().method_name}: {count_parameters(model)}"
