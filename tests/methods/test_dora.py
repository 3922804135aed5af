"""DoRA: the paper's formula on nn.Linear, GPT-2 Conv1D and nn.Embedding; the detached norm; exact merging;
DoRA and plain LoRA adapters on one layer; PEFT's file fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.core.io import config_from_peft, read_adapter_config
from peftkit.methods.dora import DoraConfig, DoraEmbedding, DoraLinear
from peftkit.methods.lora import LoraConfig, LoraLinear
from tests.tiny import Tiny, perturb_adapters, weights


def dora_weight(W0: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, out_dim: int) -> torch.Tensor:
    """m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norm taken over the input axis of each output feature."""
    V = W0 + delta
    norm = V.norm(dim=1 - out_dim, keepdim=True)
    return (m.view(-1, 1) if out_dim == 0 else m.view(1, -1)) * V / norm


def test_linear_follows_the_paper(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    peftkit.inject(model, DoraConfig(r=4, alpha=8, target_modules=["fc1"], init="random"))
    layer = model.fc1
    assert isinstance(layer, DoraLinear)
    W0, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()  # (32, 16)
    m = layer.lora_magnitude_vector["default"]
    delta = layer.delta_weight("default").detach()
    assert m.shape == (32,)
    torch.testing.assert_close(m.detach(), (W0 + delta).norm(dim=1))  # m starts at ‖W0 + s·B·A‖
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 1.5, 32))
    x = tiny_mlp.inputs["input"]
    with torch.no_grad():
        expected = x @ dora_weight(W0, delta, m.detach(), out_dim=0).T + b
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_conv1d_follows_the_paper(tiny_gpt2: Tiny) -> None:
    model = tiny_gpt2.build()
    peftkit.inject(model, DoraConfig(r=4, alpha=8, target_modules=["c_fc"]))
    perturb_adapters(model)
    layer = model.transformer.h[0].mlp.c_fc
    W0, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()  # Conv1D: (in=32, out=128)
    m = layer.lora_magnitude_vector["default"].detach()
    assert m.shape == (128,)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = x @ dora_weight(W0, layer.delta_weight("default"), m, out_dim=1) + b
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_embedding_magnitude_is_per_embedding_dimension(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, DoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, DoraEmbedding) and layer.lora_magnitude_vector["default"].shape == (32,)
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)
    perturb_adapters(model)
    W0 = layer.base_layer.weight.detach()  # (100, 32)
    m = layer.lora_magnitude_vector["default"].detach()
    ids = tiny_llama.inputs["input_ids"]
    with torch.no_grad():
        expected = F.embedding(ids, dora_weight(W0, layer.delta_weight("default"), m, out_dim=1))
        torch.testing.assert_close(layer(ids), expected, rtol=0, atol=1e-6)


def test_random_init_starts_as_its_lora(tiny_mlp: Tiny) -> None:
    torch.manual_seed(0)
    lora = peftkit.inject(tiny_mlp.build(), LoraConfig(r=4, target_modules=["fc1", "fc2"], init="random"))
    torch.manual_seed(0)
    dora = peftkit.inject(tiny_mlp.build(), DoraConfig(r=4, target_modules=["fc1", "fc2"], init="random"))
    torch.testing.assert_close(tiny_mlp.run(dora), tiny_mlp.run(lora), rtol=0, atol=1e-6)


def test_no_gradient_flows_through_the_norm(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), DoraConfig(r=4, alpha=8, target_modules=["fc1"], init="random"))
    layer = model.fc1
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    x = tiny_mlp.inputs["input"]
    probe = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    (layer(x) * probe).sum().backward()
    ours = [A.grad.clone(), B.grad.clone(), m.grad.clone()]
    A.grad = B.grad = m.grad = None
    W0, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
    V = W0 + s * B @ A
    reference = x @ (m.view(-1, 1) * V / V.norm(dim=1, keepdim=True).detach()).T + b  # the paper's sec. 4.3
    (reference * probe).sum().backward()
    for got, want in zip(ours, [A.grad, B.grad, m.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_merge_is_exact_and_unmerge_restores_the_weight_bit_for_bit(tiny_gpt2: Tiny) -> None:
    model = tiny_gpt2.build()
    before = weights(model)
    peftkit.inject(model, DoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    perturb_adapters(model)
    out = tiny_gpt2.run(model)
    peftkit.merge(model)
    layer = model.transformer.h[0].attn.c_attn
    W0 = before["transformer.h.0.attn.c_attn.weight"]
    expected = dora_weight(W0, layer.delta_weight("default").detach(),
                           layer.lora_magnitude_vector["default"].detach(), out_dim=1)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_gpt2.run(model), out, rtol=0, atol=1e-5)
    peftkit.unmerge(model)
    after = {k.replace(".base_layer.", "."): v for k, v in weights(model).items()}
    assert all(torch.equal(after[k], w) for k, w in before.items())
    assert layer._unmerged_weight is None


@pytest.mark.parametrize("dora_first", [True, False])
def test_dora_and_plain_lora_on_one_layer(tiny_mlp: Tiny, dora_first: bool) -> None:
    model = tiny_mlp.build()
    configs = [("d", DoraConfig(r=4, target_modules=["fc1"], init="random")),
               ("l", LoraConfig(r=2, target_modules=["fc1"], init="random"))]
    for name, config in configs if dora_first else configs[::-1]:
        peftkit.inject(model, config, name)
    layer = model.fc1
    assert isinstance(layer, DoraLinear) and sorted(layer.adapter_names()) == ["d", "l"]
    assert list(layer.lora_magnitude_vector) == ["d"]
    perturb_adapters(model)
    peftkit.set_active(model, ["d", "l"])
    x = tiny_mlp.inputs["input"]
    W0, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    with torch.no_grad():
        dora_w = dora_weight(W0, layer.delta_weight("d"), layer.lora_magnitude_vector["d"], out_dim=0)
        expected = x @ (dora_w + layer.delta_weight("l")).T + b  # each adapter's change from W0, added
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        out = tiny_mlp.run(model)
        peftkit.merge(model)
        torch.testing.assert_close(tiny_mlp.run(model), out, rtol=0, atol=1e-5)
        peftkit.unmerge(model)
        assert torch.equal(layer.base_layer.weight, W0)
    sd = peftkit.adapter_state_dict(model, "l")
    assert not any("magnitude" in k for k in sd)


def test_a_merged_lora_layer_is_not_converted(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(r=2, target_modules=["fc1"]))
    peftkit.merge(model)
    with pytest.raises(peftkit.ConfigError, match="merged LoRA adapters"):
        peftkit.inject(model, DoraConfig(r=4, target_modules=["fc1"]), "d")
    assert type(model.fc1) is LoraLinear


def test_dropout_changes_output_only_in_train_mode(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), DoraConfig(r=4, target_modules=["fc1"], dropout=0.5, init="random"))
    perturb_adapters(model)
    eval_out = tiny_mlp.run(model)
    model.train()
    assert not torch.allclose(tiny_mlp.run(model), eval_out)
    model.eval()
    torch.testing.assert_close(tiny_mlp.run(model), eval_out, rtol=0, atol=0)


def test_file_is_a_peft_lora_file_with_use_dora(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_llama.build(), DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["target_modules"] == ["q_proj", "v_proj"]
    keys = sorted(peftkit.adapter_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 2 * 3  # 2 layers x (q, v) x (A, B, magnitude)
    assert type(config_from_peft(cfg)) is DoraConfig
    assert type(config_from_peft({**cfg, "use_dora": False})) is LoraConfig
