"""Generic adapter helpers: freezing, counting, disabling, the adapter state dict, the active set."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.adapter import AdapterLayer, adapter_parameters, get_state
from tests.tiny import Tiny, perturb_adapters


def lora_qv(r: int = 4, **kw) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=r, alpha=8, target_modules=["q_proj", "v_proj"], **kw)


# Llama, hidden 32, GQA: q_proj is 32 -> 32, v_proj is 32 -> 16 (2 kv heads x head dim 8).
# LoRA r=4 per layer: q: A 4x32 + B 32x4 = 256; v: A 4x32 + B 16x4 = 192.
LLAMA_QV_R4 = 2 * (256 + 192)


# -- freezing and counting -----------------------------------------------------------------------------


def test_inject_freezes_base_and_trains_only_adapter(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base_total = peftkit.count_parameters(model).total
    peftkit.inject(model, lora_qv())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"
    }
    count = peftkit.count_parameters(model)
    assert count == peftkit.ParamCount(trainable=LLAMA_QV_R4, total=base_total + LLAMA_QV_R4)


def test_count_parameters_counts_tied_weights_once(tiny_gpt2: Tiny) -> None:
    model = tiny_gpt2.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    count = peftkit.count_parameters(model)
    assert count.total == sum(unique.values())
    assert count.total == sum(v.numel() for k, v in model.state_dict().items() if k != "lm_head.weight")
    assert count.trainable == count.total  # a plain model trains everything


def test_param_count_percent_and_text() -> None:
    count = peftkit.ParamCount(trainable=250, total=1000)
    assert count.percent == 25.0
    assert str(count) == "trainable params: 250 || all params: 1,000 || trainable%: 25.0000"
    assert peftkit.ParamCount(0, 0).percent == 0.0


def test_mark_only_adapters_trainable_refreezes_base(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), lora_qv())
    for p in model.parameters():
        p.requires_grad_(True)
    peftkit.mark_only_adapters_trainable(model)
    assert peftkit.count_parameters(model).trainable == LLAMA_QV_R4


def test_adapter_parameters_are_found_by_module_type_not_name(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    # a base module whose name contains "lora" is not an adapter parameter
    model.add_module("lora_A", torch.nn.Linear(2, 2))
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["fc1"]))
    assert [k for k, _ in adapter_parameters(model)] == ["fc1.lora_A.weight", "fc1.lora_B.weight"]
    assert not model.lora_A.weight.requires_grad


def test_helpers_need_an_adapter(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    for call in (lambda: get_state(model), lambda: peftkit.set_active(model, "default"),
                 lambda: peftkit.save_adapter(model, "unused"), lambda: peftkit.unload(model)):
        with pytest.raises(ValueError, match="no peftkit adapters"):
            call()


# -- disabling -----------------------------------------------------------------------------------------


def test_disable_adapters_gives_base_output_and_restores(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, lora_qv())
    perturb_adapters(model)
    adapted = tiny_llama.run(model)
    assert (adapted - base).abs().max() > 1e-2
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=0)


def test_disable_adapters_restores_after_an_exception(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), lora_qv())
    with pytest.raises(RuntimeError, match="boom"), peftkit.disable_adapters(model):
        raise RuntimeError("boom")
    assert [m.disabled for m in model.modules() if isinstance(m, AdapterLayer)] == [False] * 4


def test_disable_adapters_nested_keeps_outer_state(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), lora_qv())
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    with peftkit.disable_adapters(model):
        with peftkit.disable_adapters(model):
            pass
        assert all(m.disabled for m in layers)
    assert not any(m.disabled for m in layers)


def test_disable_adapters_on_merged_model_gives_base(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, lora_qv())
    perturb_adapters(model)
    adapted = tiny_llama.run(model)
    peftkit.merge(model)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)


# -- adapter state dict --------------------------------------------------------------------------------


def test_adapter_state_dict_uses_peft_keys(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), lora_qv())
    perturb_adapters(model)
    sd = peftkit.adapter_state_dict(model)
    assert sorted(sd) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"
    )
    layer = model.model.layers[1].self_attn.v_proj
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert sd[key].shape == (16, 4)
    assert torch.equal(sd[key], layer.lora_B["default"].weight)
    assert not sd[key].requires_grad and sd[key].is_contiguous()  # detached, like nn.Module.state_dict()


def test_adapter_state_dict_of_one_named_adapter(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), lora_qv())
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["o_proj"]), adapter_name="b")
    assert sorted(peftkit.adapter_state_dict(model, "b")) == [
        f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    ]
    assert len(peftkit.adapter_state_dict(model)) == 8  # "default" still only has q and v


def test_adapter_state_dict_includes_trained_biases(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), peftkit.LoraConfig(r=2, target_modules=["fc1"], bias="lora_only"))
    assert sorted(peftkit.adapter_state_dict(model)) == [
        "base_model.model.fc1.base_layer.bias", "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
    ]
