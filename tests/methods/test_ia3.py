"""(IA)³: output and input scaling on nn.Linear and GPT-2 Conv1D, PEFT's feed-forward rule, merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.io import config_from_peft, read_adapter_config
from peftkit.methods.ia3 import IA3Config, IA3Linear, peft_is_feedforward
from tests.tiny import Tiny, adapter_layer_names, make_tiny, perturb_adapters


def test_output_and_input_scaling_on_linear(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    peftkit.inject(model, IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"], init="random"))
    fc1, fc2 = model.fc1, model.fc2
    assert isinstance(fc1, IA3Linear) and isinstance(fc2, IA3Linear)
    l1, l2 = fc1.ia3_l["default"], fc2.ia3_l["default"]
    assert l1.shape == (32, 1) and l2.shape == (1, 32)  # PEFT's shapes: (out, 1), feed-forward (1, in)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fc1(x), fc1.base_layer(x) * l1.flatten(), rtol=0, atol=1e-6)  # bias scaled too
        torch.testing.assert_close(fc2(h), fc2.base_layer(h * l2.flatten()), rtol=0, atol=1e-6)


def test_conv1d_shapes_and_merge_axes(tiny_gpt2: Tiny) -> None:
    model = tiny_gpt2.build()
    w_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in=32, out=96)
    b_attn = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    w_proj = model.transformer.h[0].mlp.c_proj.weight.detach().clone()  # (in=128, out=32)
    b_proj = model.transformer.h[0].mlp.c_proj.bias.detach().clone()
    peftkit.inject(model, IA3Config(init="random"))  # GPT-2 defaults: c_attn, mlp.c_proj (feed-forward)
    attn, proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    la, lp = attn.ia3_l["default"].detach(), proj.ia3_l["default"].detach()
    assert la.shape == (96, 1) and lp.shape == (1, 128)
    assert not isinstance(model.transformer.h[0].attn.c_proj, IA3Linear)
    out = tiny_gpt2.run(model)
    peftkit.merge(model)
    torch.testing.assert_close(attn.base_layer.weight, w_attn * la.view(1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(attn.base_layer.bias, b_attn * la.flatten(), rtol=0, atol=1e-6)
    torch.testing.assert_close(proj.base_layer.weight, w_proj * lp.view(-1, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(proj.base_layer.bias, b_proj)  # input scaling leaves the bias alone
    torch.testing.assert_close(tiny_gpt2.run(model), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, last_two, count, feedforward", [
    ("llama", {"self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}, 6, "mlp.down_proj"),
    ("gpt2", {"attn.c_attn", "mlp.c_proj"}, 4, "mlp.c_proj"),
    # PEFT's "output.dense" also matches attention.output.dense, as a target and as a feed-forward module
    ("bert", {"self.key", "self.value", "output.dense"}, 8, "output.dense"),
    ("t5", {"SelfAttention.k", "SelfAttention.v", "EncDecAttention.k", "EncDecAttention.v", "DenseReluDense.wo"}, 16,
     "DenseReluDense.wo"),
])
def test_default_targets_and_feedforward_modules_per_family(kind: str, last_two: set[str], count: int,
                                                            feedforward: str) -> None:
    model = peftkit.inject(make_tiny(kind).build(), IA3Config())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert len(layers) == count and {".".join(n.split(".")[-2:]) for n in layers} == last_two
    for name, layer in layers.items():
        assert layer.is_feedforward["default"] == name.endswith("." + feedforward), name


def test_peft_feedforward_rule() -> None:
    # PEFT: a list entry matches a plain suffix (no dot needed), a string is a regex over the whole name
    assert peft_is_feedforward(["down_proj"], "model.layers.0.mlp.down_proj")
    assert peft_is_feedforward(["proj"], "model.layers.0.mlp.down_proj")
    assert not peft_is_feedforward(["up_proj"], "model.layers.0.mlp.down_proj")
    assert peft_is_feedforward(r".*\.mlp\..*", "model.layers.0.mlp.down_proj")
    assert not peft_is_feedforward(r"mlp", "model.layers.0.mlp.down_proj")
    assert not peft_is_feedforward([], "x")


def test_feedforward_modules_must_be_targets() -> None:
    with pytest.raises(peftkit.ConfigError, match="method.feedforward_modules must be a subset.*'fc3'"):
        IA3Config(target_modules=["fc1"], feedforward_modules=["fc3"])
    with pytest.raises(peftkit.ConfigError, match="method.init"):
        IA3Config(init="zeros")


def test_unknown_family_has_no_feedforward_modules(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), IA3Config(target_modules=["fc1", "fc2"]))
    assert not any(m.is_feedforward["default"] for m in model.modules() if isinstance(m, IA3Linear))


def test_identity_at_init_and_only_vectors_train(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, IA3Config())
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)
    # 2 layers x (k_proj 16 + v_proj 16 + down_proj 64 inputs)
    assert peftkit.count_parameters(model).trainable == 2 * (16 + 16 + 64)


def test_two_adapters_multiply_and_merge_round_trips(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    w0 = model.fc1.weight.detach().clone()
    peftkit.inject(model, IA3Config(target_modules=["fc1"], init="random"))
    peftkit.inject(model, IA3Config(target_modules=["fc1"], feedforward_modules=["fc1"], init="random"), "second")
    peftkit.set_active(model, ["default", "second"])
    layer = model.fc1
    a, b = layer.ia3_l["default"].detach(), layer.ia3_l["second"].detach()
    x = tiny_mlp.inputs["input"]
    with torch.no_grad():
        expected = layer.base_layer(x * b.flatten()) * a.flatten()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
        out = tiny_mlp.run(model)
        peftkit.merge(model)
        assert layer.merged_adapters == ["default", "second"]
        torch.testing.assert_close(tiny_mlp.run(model), out, rtol=0, atol=1e-5)
        peftkit.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_unmerge_refuses_a_zero_scale(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), IA3Config(target_modules=["fc1"]))
    with torch.no_grad():
        model.fc1.ia3_l["default"][3] = 0.0
    peftkit.merge(model)
    with pytest.raises(ValueError, match="exact zeros"):
        peftkit.unmerge(model)


@pytest.mark.parametrize("kind, target_modules, feedforward", [
    ("llama", ["down_proj", "k_proj", "v_proj"], ["down_proj"]),  # suffixes select exactly the targets
    ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
              "transformer.h.1.mlp.c_proj"], ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
])
def test_saved_config_lists_the_exact_modules(kind: str, target_modules: list[str], feedforward: list[str],
                                              tmp_path: Path) -> None:
    tiny = make_tiny(kind)
    model = peftkit.inject(tiny.build(), IA3Config())
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["peft_type"] == "IA3" and cfg["init_ia3_weights"] is True
    assert cfg["target_modules"] == target_modules and cfg["feedforward_modules"] == feedforward
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    back = config_from_peft(cfg)
    assert isinstance(back, IA3Config)
    perturb_adapters(model)
    out = tiny.run(model)
    peftkit.save_adapter(model, tmp_path / "b")
    loaded = peftkit.load_adapter(tiny.build(), tmp_path / "b")
    assert adapter_layer_names(loaded) == adapter_layer_names(model)
    torch.testing.assert_close(tiny.run(loaded), out, rtol=0, atol=0)


def test_layers_and_exclude_are_saved_as_full_names(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_llama.build(), IA3Config(layers=[1], exclude=["k_proj"]))
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    assert cfg["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
