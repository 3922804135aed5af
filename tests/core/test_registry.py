"""The method registry: a dict and a decorator, with a uniqueness check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import peftkit
from peftkit.core.config import MethodConfig
from peftkit.core.registry import METHODS, register


def test_lora_is_registered() -> None:
    methods = peftkit.list_methods()
    assert "lora" in methods and methods["lora"].startswith("LoRA")
    method = peftkit.get_method("lora")
    assert method.name == "lora" and method.config_cls is peftkit.LoraConfig
    assert peftkit.LoraConfig.method_name == "lora"


def test_unknown_method_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\); known methods: .*lora"):
        peftkit.get_method("lroa")


def test_names_are_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftkit.core.registry.METHODS", dict(METHODS))  # leave the real registry alone

    @dataclass
    class Dummy(MethodConfig):
        pass

    register("dummy-test", Dummy, "a test method")(lambda model, config, name: [])
    with pytest.raises(ValueError, match="method 'dummy-test' is already registered"):
        register("dummy-test", Dummy, "again")(lambda model, config, name: [])
    with pytest.raises(ValueError, match="method 'lora' is already registered"):
        register("lora", Dummy, "again")(lambda model, config, name: [])
