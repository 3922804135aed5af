"""peftkit: parameter-efficient fine-tuning of language models.

    model = AutoModelForCausalLM.from_pretrained(path)
    peftkit.inject(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(peftkit.count_parameters(model))
    peftkit.save_adapter(model, "out/adapter")        # PEFT-format folder
"""

# The public API, one table: name -> the module that defines it. ``__all__``, ``dir(peftkit)`` and the lazy
# attribute lookup below all read it. The names load on first use (PEP 562): ``import peftkit`` stays cheap, so the
# ``peftkit`` command can choose its memory allocator (peftkit.allocator) before torch is imported.
_EXPORTS = {
    "ParamCount": "peftkit.core.adapter",
    "count_parameters": "peftkit.core.adapter",
    "disable_adapters": "peftkit.core.adapter",
    "mark_only_adapters_trainable": "peftkit.core.adapter",
    "set_active": "peftkit.core.adapter",
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
    "combine_adapters": "peftkit.methods.lora_combine",
    "PTuningConfig": "peftkit.methods.p_tuning",
    "PrefixTuningConfig": "peftkit.methods.prefix_tuning",
    "PromptTuningConfig": "peftkit.methods.prompt_tuning",
    "QLoraConfig": "peftkit.methods.qlora",
    "SelectiveConfig": "peftkit.methods.selective",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


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
