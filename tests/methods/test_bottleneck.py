"""Bottleneck adapters: the residual MLP, placement per family, tuple outputs, init, and the merge refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.io import read_adapter_config
from peftkit.errors import NotMergeableError, PeftkitError
from peftkit.methods.bottleneck import BottleneckAdapter, BottleneckConfig
from peftkit.methods.lora import LoraConfig, LoraLinear
from tests.tiny import Tiny, adapter_layer_names, make_tiny, perturb_adapters


def test_adapter_is_a_residual_bottleneck_mlp(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), BottleneckConfig(size=4, activation="gelu", scaling=0.5,
                                                                placement="ffn"))
    perturb_adapters(model)
    layer = model.model.layers[0].mlp
    assert isinstance(layer, BottleneckAdapter) and layer.hidden_size == 32
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert down.weight.shape == (4, 32) and up.weight.shape == (32, 4)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + 0.5 * (torch.nn.functional.gelu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_attention_tuples_pass_only_hidden_states_through_the_adapter(tiny_gpt2: Tiny) -> None:
    model = peftkit.inject(tiny_gpt2.build(), BottleneckConfig(size=4, placement="attention"))
    perturb_adapters(model)
    layer = model.transformer.h[0].attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_h, base_w = layer.base_layer(x)
        h, w = layer(x)
        torch.testing.assert_close(h, layer.adapt(base_h, ["default"]))
        assert not torch.allclose(h, base_h)
        assert (w is None and base_w is None) or torch.equal(w, base_w)


@pytest.mark.parametrize("kind, placement, expected", [
    ("llama", "both", ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]),
    ("llama", "ffn", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    ("llama", "attention", ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    ("gpt2", "both", ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"]),
    # BERT: the dense sublayers of BertSelfOutput / BertOutput, before the residual + LayerNorm
    ("bert", "both", ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
                      "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"]),
    ("bert", "ffn", ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]),
])
def test_placement_per_family(kind: str, placement: str, expected: list[str]) -> None:
    model = peftkit.inject(make_tiny(kind).build(), BottleneckConfig(size=4, placement=placement))
    assert adapter_layer_names(model) == expected
    assert model.peftkit_state.targets["default"] == expected


def test_layers_and_explicit_modules(tiny_mlp: Tiny, tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), BottleneckConfig(size=4, layers=[1]))
    assert adapter_layer_names(model) == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    mlp = peftkit.inject(tiny_mlp.build(), BottleneckConfig(size=4, placement="ffn", ffn_modules=["fc1", "fc2"]))
    assert adapter_layer_names(mlp) == ["fc1", "fc2"] and mlp.fc1.hidden_size == 32


def test_unknown_family_needs_modules(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    with pytest.raises(peftkit.ConfigError, match="set method.ffn_modules"):
        peftkit.inject(model, BottleneckConfig(size=4, placement="ffn"))
    assert getattr(model, "peftkit_state", None) is None and adapter_layer_names(model) == []


def test_near_identity_init(tiny_bert: Tiny) -> None:
    model = tiny_bert.build()
    base = tiny_bert.run(model)
    peftkit.inject(model, BottleneckConfig(size=8, init_std=0.01))
    torch.testing.assert_close(tiny_bert.run(model), base, rtol=0, atol=0)
    for layer in model.modules():
        if isinstance(layer, BottleneckAdapter):
            down, up = layer.adapter_down["default"], layer.adapter_up["default"]
            assert down.weight.abs().max() <= 0.02 and down.weight.std() > 0.002  # N(0, 0.01²) cut at 2σ
            assert not down.bias.any() and not up.weight.any() and not up.bias.any()
    # 4 adapters x (32*8 + 8 + 8*32 + 32)
    assert peftkit.count_parameters(model).trainable == 4 * (32 * 8 + 8 + 8 * 32 + 32)


def test_merge_is_refused_clearly_and_nothing_is_merged(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], init="random"))  # mergeable, named first
    peftkit.inject(model, BottleneckConfig(size=4, placement="ffn"), "bn")
    peftkit.set_active(model, ["default", "bn"])
    with pytest.raises(NotMergeableError, match=r"adapter 'bn' \(bottleneck_adapter\) cannot be merged.*"
                                                r"'model.layers.0.mlp'") as err:
        peftkit.merge(model)
    assert isinstance(err.value, PeftkitError) and isinstance(err.value, TypeError)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    with pytest.raises(NotMergeableError):
        peftkit.unload(model, merge=True)
    assert adapter_layer_names(model)  # still attached
    peftkit.unload(model)
    torch.testing.assert_close(tiny_llama.run(model), tiny_llama.run(tiny_llama.build()), rtol=0, atol=0)


def test_two_adapters_stack_and_switch(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, BottleneckConfig(size=4, placement="ffn"))
    peftkit.inject(model, BottleneckConfig(size=2, placement="ffn", activation="tanh"), "other")
    perturb_adapters(model)
    layer = model.model.layers[0].mlp
    assert sorted(layer.adapter_names()) == ["default", "other"]
    only_default = tiny_llama.run(model)
    peftkit.set_active(model, ["default", "other"])
    both = tiny_llama.run(model)
    assert not torch.allclose(both, only_default)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.adapt(layer.adapt(layer.base_layer(x), ["default"]), ["other"]))
    peftkit.delete_adapter(model, "other")
    torch.testing.assert_close(tiny_llama.run(model), only_default, rtol=0, atol=0)
    assert "other" not in layer.adapter_act and "other" not in layer.adapter_scaling


def test_saved_file_lists_the_exact_modules(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_llama.build(), BottleneckConfig(size=4, layers=[0], activation="silu"))
    perturb_adapters(model)
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["peft_type"] == "PEFTKIT_BOTTLENECK_ADAPTER" and cfg["peftkit_method"] == "bottleneck_adapter"
    assert cfg["attention_modules"] == ["model.layers.0.self_attn"] and cfg["ffn_modules"] == ["model.layers.0.mlp"]
    assert cfg["layers"] is None and cfg["activation"] == "silu" and cfg["size"] == 4
    assert sorted(peftkit.adapter_state_dict(model)) == sorted(
        f"base_model.model.model.layers.0.{m}.adapter_{p}.{t}"
        for m in ("self_attn", "mlp") for p in ("down", "up") for t in ("weight", "bias"))
    loaded = peftkit.load_adapter(tiny_llama.build(), tmp_path / "a")
    torch.testing.assert_close(tiny_llama.run(loaded), tiny_llama.run(model), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "method.size"),
    ({"activation": "swish"}, "method.activation"),
    ({"placement": "everywhere"}, "method.placement"),
    ({"dropout": 1.0}, "method.dropout"),
    ({"init_std": -1.0}, "method.init_std"),
])
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(peftkit.ConfigError, match=message):
        BottleneckConfig(**kwargs)
