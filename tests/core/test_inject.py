"""Attaching and detaching: module replacement, named adapters, merge / unmerge / unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.adapter import AdapterLayer, adapter_parameters
from peftkit.core.inject import replace_module, wrap_modules
from peftkit.methods.lora import LoraLinear
from tests.tiny import Tiny, adapter_layer_names, perturb_adapters, weights

QV = ["q_proj", "v_proj"]


def lora(targets, r: int = 4, alpha: float = 8, **kw) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=r, alpha=alpha, target_modules=targets, **kw)


# -- the replacement helpers ------------------------------------------------------------------------------


def test_replace_module_nested_and_top_level(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    new = nn.Identity()
    replace_module(model, "act1", new)
    assert model.act1 is new
    outer = nn.Module()
    outer.inner = tiny_mlp.build()
    replace_module(outer, "inner.fc2", new)
    assert outer.inner.fc2 is new


def test_wrap_modules_keeps_modules_the_wrapper_returns_unchanged(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    fc1, fc2 = model.fc1, model.fc2
    wrap_modules(model, ["fc1", "fc2"], lambda name, m: nn.Sequential(m) if name == "fc1" else m)
    assert isinstance(model.fc1, nn.Sequential) and model.fc1[0] is fc1
    assert model.fc2 is fc2


# -- inject errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a.b", "a/b"])
def test_invalid_adapter_names(tiny_mlp: Tiny, bad: str) -> None:
    model = tiny_mlp.build()
    with pytest.raises(ValueError, match="invalid adapter name"):
        peftkit.inject(model, lora(["fc1"]), adapter_name=bad)
    assert adapter_layer_names(model) == [] and not hasattr(model, "peftkit_state")


def test_duplicate_adapter_name(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), lora(["fc1"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        peftkit.inject(model, lora(["fc2"]))
    assert adapter_layer_names(model) == ["fc1"]
    assert list(model.peftkit_state.configs) == ["default"]


def test_inject_returns_the_same_model(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    assert peftkit.inject(model, lora(["fc1"])) is model


# -- several named adapters ------------------------------------------------------------------------------


def two_adapters(tiny: Tiny) -> nn.Module:
    """Llama with "default" on q/v (active) and "b" on q/o (loaded inactive), both with random weights."""
    model = tiny.build()
    peftkit.inject(model, lora(QV))
    perturb_adapters(model, "default", seed=1)
    peftkit.inject(model, lora(["q_proj", "o_proj"], r=2, init="random"), adapter_name="b")
    return model


def test_second_adapter_is_loaded_inactive(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, lora(QV))
    perturb_adapters(model, "default", seed=1)
    default_only = tiny_llama.run(model)
    peftkit.inject(model, lora(["q_proj", "o_proj"], r=2, init="random"), adapter_name="b")
    state = model.peftkit_state
    assert list(state.configs) == ["default", "b"] and state.active == ["default"]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.adapter_names() == ["default", "b"] and attn.q_proj.active_adapters == ["default"]
    assert attn.o_proj.adapter_names() == ["b"] and attn.o_proj.active_adapters == []
    assert attn.q_proj.lora_A["b"].weight.shape == (2, 32)
    torch.testing.assert_close(tiny_llama.run(model), default_only, rtol=0, atol=0)
    # only the active adapter trains
    default = [p for _, p in adapter_parameters(model, "default")]
    assert peftkit.count_parameters(model).trainable == sum(p.numel() for p in default) == 2 * (256 + 192)


def test_set_active_switches_adapter(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = two_adapters(tiny_llama)
    peftkit.set_active(model, "b")
    assert model.peftkit_state.active == ["b"]
    assert model.model.layers[0].self_attn.v_proj.active_adapters == []
    # same output as a fresh base carrying only adapter "b"
    peftkit.save_adapter(model, tmp_path / "b", adapter_name="b")
    only_b = peftkit.load_adapter(tiny_llama.build(), tmp_path / "b")
    torch.testing.assert_close(tiny_llama.run(model), tiny_llama.run(only_b), rtol=0, atol=1e-6)
    # training "b" next: the caller re-marks trainable parameters
    peftkit.mark_only_adapters_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b.weight" in n for n in trainable)
    assert len(trainable) == 8  # q and o in 2 layers, A and B


def test_two_active_adapters_add_their_deltas(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    peftkit.inject(model, lora(["fc1"], init="random"))
    peftkit.inject(model, lora(["fc1"], r=2, alpha=3, init="random"), adapter_name="b")
    peftkit.set_active(model, ["default", "b"])
    layer = model.fc1
    x = tiny_mlp.inputs["input"]
    with torch.no_grad():
        expected = layer.base_layer(x)
        for name, scale in (("default", 8 / 4), ("b", 3 / 2)):
            expected = expected + scale * x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
        # merging both equals running both
        unmerged = tiny_mlp.run(model)
        peftkit.merge(model)
        assert layer.merged_adapters == ["default", "b"]
        torch.testing.assert_close(tiny_mlp.run(model), unmerged, rtol=0, atol=1e-5)


def test_set_active_unknown_name(tiny_llama: Tiny) -> None:
    model = two_adapters(tiny_llama)
    with pytest.raises(ValueError, match="no adapter named 'c'; loaded adapters: default, b"):
        peftkit.set_active(model, ["b", "c"])
    assert model.peftkit_state.active == ["default"]


def test_set_active_unmerges_first(tiny_llama: Tiny) -> None:
    model = two_adapters(tiny_llama)
    base_q = weights(tiny_llama.build())["model.layers.0.self_attn.q_proj.weight"]
    peftkit.merge(model)
    peftkit.set_active(model, "b")
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == []
    torch.testing.assert_close(q.base_layer.weight, base_q, rtol=0, atol=1e-6)


def test_delete_adapter_unwraps_modules_only_it_used(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    original_o = model.model.layers[0].self_attn.o_proj
    peftkit.inject(model, lora(QV))
    perturb_adapters(model, "default", seed=1)
    default_only = tiny_llama.run(model)
    peftkit.inject(model, lora(["q_proj", "o_proj"], r=2, init="random"), adapter_name="b")
    peftkit.set_active(model, ["default", "b"])
    assert not torch.allclose(tiny_llama.run(model), default_only)

    peftkit.delete_adapter(model, "b")
    attn = model.model.layers[0].self_attn
    assert attn.o_proj is original_o  # the plain nn.Linear is back
    assert isinstance(attn.q_proj, LoraLinear) and attn.q_proj.adapter_names() == ["default"]
    assert "b" not in attn.q_proj.lora_A and "b" not in attn.q_proj.lora_dropout
    assert list(model.peftkit_state.configs) == ["default"] and model.peftkit_state.active == ["default"]
    assert not [n for n, _ in model.named_parameters() if ".b." in n]
    torch.testing.assert_close(tiny_llama.run(model), default_only, rtol=0, atol=1e-6)


def test_delete_the_last_adapter_gives_base_back(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, lora(QV, init="random"))
    peftkit.delete_adapter(model, "default")
    assert adapter_layer_names(model) == []
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)
    peftkit.inject(model, lora(["o_proj"]), adapter_name="again")  # the model can be adapted anew
    assert len(adapter_layer_names(model)) == 2


def test_delete_adapter_errors(tiny_llama: Tiny) -> None:
    model = two_adapters(tiny_llama)
    with pytest.raises(ValueError, match="no adapter named 'c'; loaded: default, b"):
        peftkit.delete_adapter(model, "c")
    peftkit.merge(model)
    with pytest.raises(ValueError, match="'default' is merged; unmerge it before deleting it"):
        peftkit.delete_adapter(model, "default")
    assert list(model.peftkit_state.configs) == ["default", "b"]


# -- merge / unmerge / unload ------------------------------------------------------------------------------


def adapted_llama(tiny: Tiny) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """(model with a random all-linear LoRA, the base weights, the adapted output)."""
    model = tiny.build()
    base_weights = weights(model)
    peftkit.inject(model, lora("all-linear", init="random"))
    return model, base_weights, tiny.run(model)


def test_merge_and_unmerge(tiny_llama: Tiny) -> None:
    model, base_weights, adapted = adapted_llama(tiny_llama)
    q = model.model.layers[1].self_attn.q_proj
    w0 = base_weights["model.layers.1.self_attn.q_proj.weight"]
    expected = w0 + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    peftkit.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(q.base_layer.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)
    peftkit.merge(model)  # merging twice does not add the delta twice
    torch.testing.assert_close(q.base_layer.weight, expected, rtol=0, atol=1e-6)
    peftkit.unmerge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(q.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)


def test_merged_layers_skip_the_adapter_branch(tiny_llama: Tiny) -> None:
    model, _, adapted = adapted_llama(tiny_llama)
    peftkit.merge(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B["default"].weight.mul_(100.0)  # would change the output if it were still computed
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)


def test_unload_with_merge_gives_a_plain_model(tiny_llama: Tiny) -> None:
    model, base_weights, adapted = adapted_llama(tiny_llama)
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            expected[name + ".weight"] = (m.base_layer.weight + m.delta_weight("default")).detach().clone()
    out = peftkit.unload(model, merge=True)
    assert out is model and type(model).__name__ == "LlamaForCausalLM"
    assert adapter_layer_names(model) == [] and not hasattr(model, "peftkit_state")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    sd = model.state_dict()
    assert list(sd) == list(base_weights)  # same keys, same order: loadable as the base architecture
    assert not [k for k in sd if "lora" in k or "base_layer" in k]
    assert len(expected) == 14
    for key, w in expected.items():
        torch.testing.assert_close(sd[key], w, rtol=0, atol=1e-6)
        assert not torch.allclose(sd[key], base_weights[key])
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)
    # the merged weights reload into a fresh base and give the fine-tuned output
    fresh = tiny_llama.build()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(tiny_llama.run(fresh), adapted, rtol=0, atol=1e-5)


def test_unload_without_merge_restores_the_original(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    originals = {n: m for n, m in model.named_modules()}
    base_weights = weights(model)
    peftkit.inject(model, lora("all-linear", init="random"))
    peftkit.unload(model)
    assert {n: m for n, m in model.named_modules()} == originals  # the very same module objects
    sd = model.state_dict()
    assert list(sd) == list(base_weights)
    assert all(torch.equal(sd[k], base_weights[k]) for k in sd)
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)


def test_unload_without_merge_after_merge_unmerges(tiny_llama: Tiny) -> None:
    model, base_weights, _ = adapted_llama(tiny_llama)
    peftkit.merge(model)
    peftkit.unload(model, merge=False)
    sd = model.state_dict()
    for k, w in base_weights.items():
        torch.testing.assert_close(sd[k], w, rtol=0, atol=1e-6)


def test_merge_refuses_tied_weights(tiny_gpt2: Tiny) -> None:
    # GPT-2's lm_head shares wte's weight: merging an embedding LoRA would change the head too
    model = tiny_gpt2.build()
    base_weights = weights(model)
    peftkit.inject(model, lora(["wte", "c_attn"], init="random"))
    adapted = tiny_gpt2.run(model)
    for call in (lambda: peftkit.merge(model), lambda: peftkit.unload(model, merge=True)):
        with pytest.raises(ValueError, match="'transformer.wte': its weight is tied to 'lm_head.weight'"):
            call()
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))  # nothing half-merged
    torch.testing.assert_close(model.lm_head.weight, base_weights["lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tiny_gpt2.run(model), adapted, rtol=0, atol=0)
    peftkit.unload(model, merge=False)  # unloading without merging is fine
    torch.testing.assert_close(model.lm_head.weight, base_weights["lm_head.weight"], rtol=0, atol=0)
