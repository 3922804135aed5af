"""A method that wraps a whole block (bottleneck adapters, LLaMA-Adapter wrap ``self_attn``/``mlp``) and one
that wraps layers inside it (LoRA on ``q_proj``) as two named adapters on the same block.

Nested, the inner adapter's paths would move under it (``self_attn.base_layer.q_proj``): before this was
refused, LoRA after a bottleneck found "no module" and a bottleneck after LoRA left a LoRA adapter that could not
be saved. Now either order is a clear ConfigError naming both modules, the model is left as it was, and the
two methods on *different* blocks keep working (save -> load round trip of both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.bottleneck import BottleneckAdapter, BottleneckConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.lora import LoraConfig, LoraLinear
from tests.tiny import Tiny, adapter_layer_names, perturb_adapters

BLOCK_WRAPPERS = {
    "bottleneck_adapter": lambda: BottleneckConfig(size=4),
    "llama_adapter": lambda: LlamaAdapterConfig(adapter_len=2, adapter_layers=2),
}


@pytest.mark.parametrize("wrapper", sorted(BLOCK_WRAPPERS))
@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_lora_inside_a_wrapped_block_is_refused(wrapper: str, targets, tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, BLOCK_WRAPPERS[wrapper](), "block")
    before = adapter_layer_names(model)
    with pytest.raises(ConfigError, match=r"cannot adapt 'model.layers.0.self_attn.q_proj': it sits inside "
                                          r"'model.layers.0.self_attn', which \w+ already wraps as a whole"):
        peftkit.inject(model, LoraConfig(r=2, target_modules=targets), "lora")
    assert adapter_layer_names(model) == before and list(model.peftkit_state.configs) == ["block"]


@pytest.mark.parametrize("wrapper", sorted(BLOCK_WRAPPERS))
def test_block_wrapper_around_lora_is_refused_before_anything_is_wrapped(wrapper: str, tiny_llama: Tiny,
                                                                          tmp_path: Path) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], layers=[1], init="random"))
    expected, before = tiny_llama.run(model), adapter_layer_names(model)
    with pytest.raises(ConfigError, match=r"cannot adapt 'model.layers.1.self_attn': it holds "
                                          r"'model.layers.1.self_attn.q_proj', already adapted by LoraLinear"):
        peftkit.inject(model, BLOCK_WRAPPERS[wrapper](), "block")
    # layer 0's block (no LoRA inside) was not wrapped on the way: the model is as it was, LoRA still saves
    assert adapter_layer_names(model) == before
    assert list(model.peftkit_state.configs) == ["default"]
    torch.testing.assert_close(tiny_llama.run(model), expected, rtol=0, atol=0)
    peftkit.save_adapter(model, tmp_path / "lora")


def test_bert_sublayer_shared_by_bottleneck_and_lora_is_refused(tiny_bert: Tiny) -> None:
    model = tiny_bert.build()
    peftkit.inject(model, BottleneckConfig(size=4), "bn")
    with pytest.raises(ConfigError, match=r"'encoder.layer.0.attention.output.dense' is already adapted by another "
                                          r"method \(BottleneckAdapter\)"):
        peftkit.inject(model, LoraConfig(r=2, target_modules=["dense"]), "lora")


def test_different_blocks_combine_and_round_trip(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, BottleneckConfig(size=4, placement="ffn"), "bn")
    peftkit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora")
    perturb_adapters(model, std=0.3)
    peftkit.set_active(model, ["bn", "lora"])
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    assert isinstance(model.model.layers[0].mlp, BottleneckAdapter)
    expected = tiny_llama.run(model)
    for name in ("bn", "lora"):
        peftkit.save_adapter(model, tmp_path / name, name)
    fresh = tiny_llama.build()
    for name in ("bn", "lora"):
        peftkit.load_adapter(fresh, tmp_path / name, name)
    peftkit.set_active(fresh, ["bn", "lora"])
    torch.testing.assert_close(tiny_llama.run(fresh), expected, atol=1e-6, rtol=1e-6)


def test_lora_beside_a_wrapped_block_in_another_layer_is_fine(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, BottleneckConfig(size=4, placement="attention", layers=[1]), "bn")
    peftkit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], layers=[0]), "lora")
    peftkit.inject(model, LoraConfig(r=2, target_modules=["v_proj"], exclude=r"model\.layers\.1\..*"), "lora2")
    assert isinstance(model.model.layers[0].self_attn.v_proj, LoraLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    assert isinstance(model.model.layers[1].self_attn, BottleneckAdapter)
