"""peftkit: parameter-efficient fine-tuning of language models.

    model = AutoModelForCausalLM.from_pretrained(path)
    peftkit.inject(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(peftkit.count_parameters(model))
    peftkit.save_adapter(model, "out/adapter")        # PEFT-format folder
"""

from typing import TYPE_CHECKING

# The names below load on first use (PEP 562): ``import peftkit`` stays cheap, so the ``peftkit`` command can
# choose its memory allocator (peftkit.allocator) before torch is imported.
_EXPORTS = {
    "ParamCount": "peftkit.core.adapter",
    "count_parameters": "peftkit.core.adapter",
    "disable_adapters": "peftkit.core.adapter",
    "mark_only_adapters_trainable": "peftkit.core.adapter",
    "set_active": "peftkit.core.adapter",
    "combine_adapters": "peftkit.core.combine",
    "ConfigError": "peftkit.core.config",
    "delete_adapter": "peftkit.core.inject",
    "inject": "peftkit.core.inject",
    "merge": "peftkit.core.inject",
    "unload": "peftkit.core.inject",
    "unmerge": "peftkit.core.inject",
    "AdapterFileError": "peftkit.core.io",
    "adapter_state_dict": "peftkit.core.io",
    "load_adapter": "peftkit.core.io",
    "save_adapter": "peftkit.core.io",
    "mixed_batch": "peftkit.core.mixed",
    "get_method": "peftkit.core.registry",
    "list_methods": "peftkit.core.registry",
    "BitFitConfig": "peftkit.methods.bitfit",
    "BottleneckConfig": "peftkit.methods.bottleneck",
    "DoraConfig": "peftkit.methods.dora",
    "FullConfig": "peftkit.methods.full",
    "IA3Config": "peftkit.methods.ia3",
    "LinearProbeConfig": "peftkit.methods.linear_probe",
    "LlamaAdapterConfig": "peftkit.methods.llama_adapter",
    "LoraConfig": "peftkit.methods.lora",
    "PTuningConfig": "peftkit.methods.p_tuning",
    "PrefixTuningConfig": "peftkit.methods.prefix_tuning",
    "PromptTuningConfig": "peftkit.methods.prompt_tuning",
    "SelectiveConfig": "peftkit.methods.selective",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from peftkit.core.adapter import (
        ParamCount,
        count_parameters,
        disable_adapters,
        mark_only_adapters_trainable,
        set_active,
    )
    from peftkit.core.combine import combine_adapters
    from peftkit.core.config import ConfigError
    from peftkit.core.inject import delete_adapter, inject, merge, unload, unmerge
    from peftkit.core.io import AdapterFileError, adapter_state_dict, load_adapter, save_adapter
    from peftkit.core.mixed import mixed_batch
    from peftkit.core.registry import get_method, list_methods
    from peftkit.methods.bitfit import BitFitConfig
    from peftkit.methods.bottleneck import BottleneckConfig
    from peftkit.methods.dora import DoraConfig
    from peftkit.methods.full import FullConfig
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.linear_probe import LinearProbeConfig
    from peftkit.methods.llama_adapter import LlamaAdapterConfig
    from peftkit.methods.lora import LoraConfig
    from peftkit.methods.p_tuning import PTuningConfig
    from peftkit.methods.prefix_tuning import PrefixTuningConfig
    from peftkit.methods.prompt_tuning import PromptTuningConfig
    from peftkit.methods.selective import SelectiveConfig


__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "BitFitConfig",
    "BottleneckConfig",
    "ConfigError",
    "DoraConfig",
    "FullConfig",
    "IA3Config",
    "LinearProbeConfig",
    "LlamaAdapterConfig",
    "LoraConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "ParamCount",
    "adapter_state_dict",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "get_method",
    "inject",
    "list_methods",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge",
    "mixed_batch",
    "save_adapter",
    "set_active",
    "unload",
    "unmerge",
]
