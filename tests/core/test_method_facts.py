"""What a method is, declared on its config (``MethodConfig``): defaults for a method that declares nothing, and
facts that agree with each other and with what attaching the method does, for every registered method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch.nn as nn

import peftkit
from peftkit.core.config import MethodConfig
from peftkit.core.registry import METHODS, get_method
from peftkit.methods.lora import LoraConfig
from tests.methods.test_invariants import SPECS
from tests.tiny import make_tiny

peftkit.list_methods()  # registers the built-in methods
IN_PLACE = {"selective", "bitfit", "linear_probe", "full"}
SOFT_PROMPTS = {"prompt_tuning", "p_tuning", "prefix_tuning"}


@dataclass
class _Bare(MethodConfig):
    """A method config that declares no fact."""

    size: int = 1


def test_a_method_declaring_nothing_gets_the_base_defaults():
    config = _Bare()
    assert config.in_place is False and config.writes_full_model is False
    assert config.bias == "none" and config.modules_to_save is None
    assert config.virtual_tokens == 0 and config.virtual_token_kind is None
    assert config.trains_base_tensors() is False
    assert list(config.trainable_base_parameters(nn.Linear(2, 2))) == []
    assert config.default_lr == MethodConfig.default_lr
    assert [f.name for f in dataclasses.fields(config)] == ["size"]  # facts are no config fields (nor YAML keys)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declared_facts_are_consistent(name):
    config = SPECS[name].config(SPECS[name].kinds[0])  # some need a setting (selective: what to select)
    assert type(config) is get_method(name).config_cls
    assert config.in_place is (name in IN_PLACE)
    assert config.writes_full_model is (name == "full")
    assert config.trains_base_tensors() is config.in_place  # at its defaults: no biases, no modules_to_save
    assert (config.virtual_tokens > 0) is (config.virtual_token_kind is not None) is (name in SOFT_PROMPTS)
    assert config.virtual_token_kind in (None, "embeddings", "prefix")
    assert config.bias in ("none", "all", "lora_only") and config.default_lr > 0
    fields = {f.name for f in dataclasses.fields(config)}
    assert not fields & {"in_place", "writes_full_model", "virtual_tokens", "virtual_token_kind"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trains_base_tensors_says_whether_attaching_trains_base_parameters(name):
    kind = SPECS[name].kinds[0]
    model = make_tiny(kind).build()
    kept = list(model.parameters())  # held: a freed parameter's id may be reused (QLoRA replaces quantized ones)
    base = {id(p) for p in kept}
    config = SPECS[name].config(kind)
    peftkit.inject(model, config)
    trains_base = any(p.requires_grad and id(p) in base for p in model.parameters())
    assert config.trains_base_tensors() is trains_base


@pytest.mark.parametrize("change", [{"bias": "all"}, {"bias": "lora_only"}, {"modules_to_save": ["lm_head"]}])
def test_biases_or_modules_to_save_make_an_adapter_train_base_tensors(change):
    assert LoraConfig().trains_base_tensors() is False
    assert dataclasses.replace(LoraConfig(), **change).trains_base_tensors() is True
