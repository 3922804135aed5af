"""LoRA: the layer math on nn.Linear, GPT-2 Conv1D and nn.Embedding, and every LoraConfig option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.adapter import AdapterLayer
from peftkit.methods.lora import LoraConfig, LoraEmbedding, LoraLinear
from tests.tiny import Tiny, build_mlp, make_tiny, perturb_adapters


def lora_delta(layer: LoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """s * B A x, written out."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
    return layer.scaling[name] * x @ A.T @ B.T


# -- the three layer kinds ---------------------------------------------------------------------------------


def test_linear_output_is_base_plus_scaled_low_rank_update(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(r=4, alpha=12, target_modules=["fc1"], init="random"))
    layer = model.fc1
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, nn.Linear)
    assert layer.lora_A["default"].weight.shape == (4, 16) and layer.lora_B["default"].weight.shape == (32, 4)
    assert layer.scaling["default"] == 3.0
    x = tiny_mlp.inputs["input"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + lora_delta(layer, x), rtol=0, atol=1e-6)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer.delta_weight("default"), 3.0 * B @ A)


def test_conv1d_is_wrapped_with_transposed_delta(tiny_gpt2: Tiny) -> None:
    model = tiny_gpt2.build()
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in=32, out=96)
    peftkit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], init="random"))
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer.base_layer).__name__ == "Conv1D" and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)
    delta = layer.delta_weight("default")
    assert delta.shape == w0.shape == (32, 96)
    torch.testing.assert_close(delta, 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w0 + layer.base_layer.bias + lora_delta(layer, x), rtol=0, atol=1e-5)
        peftkit.merge(model)
        torch.testing.assert_close(layer.base_layer.weight, w0 + delta, rtol=0, atol=1e-6)


def test_embedding_lora(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and isinstance(layer.base_layer, nn.Embedding)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (4, 100) and B.shape == (32, 4)
    assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) > 0  # PEFT's init: A zero, B normal
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)
    assert sorted(peftkit.adapter_state_dict(model)) == [
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B",
    ]

    perturb_adapters(model)
    ids = tiny_llama.inputs["input_ids"]
    with torch.no_grad():
        expected = layer.base_layer(ids) + 2.0 * A.T[ids] @ B.T  # (batch, seq, dim)
        torch.testing.assert_close(layer(ids), expected, rtol=0, atol=1e-6)
        adapted = tiny_llama.run(model)
        assert (adapted - base).abs().max() > 1e-2
        w0 = layer.base_layer.weight.clone()
        peftkit.merge(model)
        torch.testing.assert_close(layer.base_layer.weight, w0 + 2.0 * (B @ A).T, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny_llama.run(model), adapted, rtol=0, atol=1e-5)


def test_embedding_random_init_changes_output(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, LoraConfig(target_modules=["embed_tokens"], init="random"))
    assert torch.count_nonzero(model.model.embed_tokens.lora_embedding_A["default"]) > 0
    assert (tiny_llama.run(model) - base).abs().max() > 1e-2


def test_embedding_keeps_padding_idx() -> None:
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 4, padding_idx=0))
    peftkit.inject(model, LoraConfig(r=2, target_modules=["emb"], init="random"))
    out = model(torch.tensor([0, 0, 3]))
    out.sum().backward()
    # the padding row gets no gradient through the LoRA branch either
    assert torch.count_nonzero(model.emb.lora_embedding_A["default"].grad[:, 0]) == 0
    assert torch.count_nonzero(model.emb.lora_embedding_A["default"].grad[:, 3]) > 0


def test_gqa_projections_get_their_own_shapes(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.lora_B["default"].weight.shape == (32, 4)
    assert attn.k_proj.lora_B["default"].weight.shape == (16, 4)  # 2 kv heads x head dim 8
    assert attn.v_proj.lora_B["default"].weight.shape == (16, 4)


# -- init -------------------------------------------------------------------------------------------------


def test_kaiming_init(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    base = tiny_mlp.run(model)
    peftkit.inject(model, LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    for layer, fan_in in ((model.fc1, 16), (model.fc2, 32)):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(B) == 0
        assert torch.count_nonzero(A) == A.numel()
        assert A.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound
    torch.testing.assert_close(tiny_mlp.run(model), base, rtol=0, atol=0)


def test_gaussian_init() -> None:
    model = nn.Sequential()
    model.add_module("big", nn.Linear(512, 64))
    peftkit.inject(model, LoraConfig(r=8, target_modules=["big"], init="gaussian"))
    A, B = model.big.lora_A["default"].weight, model.big.lora_B["default"].weight
    assert torch.count_nonzero(B) == 0
    assert abs(A.std().item() - 1 / 8) < 0.01 and abs(A.mean().item()) < 0.01  # N(0, 1/r)
    x = torch.randn(3, 512)
    torch.testing.assert_close(model(x), model.big.base_layer(x), rtol=0, atol=0)


def test_random_init_changes_output(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()
    base = tiny_mlp.run(model)
    peftkit.inject(model, LoraConfig(target_modules=["fc1"], init="random"))
    assert torch.count_nonzero(model.fc1.lora_B["default"].weight) > 0
    assert (tiny_mlp.run(model) - base).abs().max() > 1e-2


# -- rank, alpha, rsLoRA, patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(("r", "alpha", "rslora", "scaling"), [(4, 8, False, 2.0), (16, 8, False, 0.5), (4, 8, True, 4.0),
                                                              (16, 8, True, 2.0), (1, 1, True, 1.0)])
def test_scaling(r: int, alpha: float, rslora: bool, scaling: float) -> None:
    config = LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["fc1"])
    assert config.scaling("fc1") == scaling
    model = peftkit.inject(build_mlp(), config)
    assert model.fc1.scaling["default"] == scaling


def test_rslora_scales_the_update_by_sqrt_r(tiny_mlp: Tiny) -> None:
    plain = peftkit.inject(tiny_mlp.build(), LoraConfig(r=16, alpha=8, target_modules=["fc1"]))
    rs = peftkit.inject(tiny_mlp.build(), LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["fc1"]))
    perturb_adapters(plain)
    perturb_adapters(rs)  # same seed: identical A and B
    x = tiny_mlp.inputs["input"]
    with torch.no_grad():
        d_plain = plain.fc1(x) - plain.fc1.base_layer(x)
        d_rs = rs.fc1(x) - rs.fc1.base_layer(x)
    torch.testing.assert_close(d_rs, d_plain * math.sqrt(16), rtol=1e-5, atol=1e-6)


def test_rank_and_alpha_patterns(tiny_llama: Tiny) -> None:
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                        alpha_pattern={"o_proj": 1, r"model\.layers\.0\.self_attn\.v_proj": 3})
    model = peftkit.inject(tiny_llama.build(), config)
    got = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            short = name.removeprefix("model.layers.").replace(".self_attn", "")
            got[short] = (m.lora_A["default"].weight.shape[0], m.scaling["default"])
    assert got == {
        "0.q_proj": (2, 8 / 2), "0.v_proj": (4, 3 / 4), "0.o_proj": (4, 1 / 4),
        "1.q_proj": (2, 8 / 2), "1.v_proj": (6, 8 / 6), "1.o_proj": (4, 1 / 4),
    }


def test_pattern_keys_match_whole_name_segments(tiny_llama: Tiny) -> None:
    # "proj" is not a suffix after a dot: it matches nothing, as in PEFT
    config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"proj": 2})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.proj") == 2


# -- dropout ---------------------------------------------------------------------------------------------


def test_dropout_changes_output_only_in_train_mode(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(r=4, dropout=0.5, target_modules=["fc1", "fc2"], init="random"))
    assert isinstance(model.fc1.lora_dropout["default"], nn.Dropout) and model.fc1.lora_dropout["default"].p == 0.5
    eval_out = tiny_mlp.run(model)
    torch.testing.assert_close(tiny_mlp.run(model), eval_out, rtol=0, atol=0)  # eval is deterministic
    # eval equals the same adapter without dropout
    no_drop = peftkit.inject(tiny_mlp.build(), LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    no_drop.load_state_dict(model.state_dict())
    torch.testing.assert_close(tiny_mlp.run(no_drop), eval_out, rtol=0, atol=0)

    model.train()
    torch.manual_seed(0)
    a, b = tiny_mlp.run(model), tiny_mlp.run(model)
    assert not torch.allclose(a, eval_out) and not torch.allclose(a, b)


def test_new_layers_follow_the_model_train_or_eval_mode(tiny_mlp: Tiny) -> None:
    model = tiny_mlp.build()  # eval mode
    peftkit.inject(model, LoraConfig(dropout=0.2, target_modules=["fc1"]))
    peftkit.inject(model, LoraConfig(dropout=0.2, target_modules=["fc1", "fc2"]), adapter_name="b")
    assert not any(m.training for m in model.modules())
    trained = tiny_mlp.build().train()
    peftkit.inject(trained, LoraConfig(dropout=0.2, target_modules=["fc1"]))
    assert all(m.training for m in trained.modules())


def test_no_dropout_means_train_equals_eval(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(r=4, dropout=0.0, target_modules=["fc1", "fc2"], init="random"))
    assert isinstance(model.fc1.lora_dropout["default"], nn.Identity)
    eval_out = tiny_mlp.run(model)
    model.train()
    torch.testing.assert_close(tiny_mlp.run(model), eval_out, rtol=0, atol=0)


# -- bias options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bias", "trained_biases"),
    [
        ("none", []),
        ("lora_only", ["fc1.base_layer.bias"]),
        ("all", ["fc1.base_layer.bias", "fc2.bias", "out.bias"]),
    ],
)
def test_bias_options(tiny_mlp: Tiny, bias: str, trained_biases: list[str]) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(r=2, target_modules=["fc1"], bias=bias))
    lora = ["fc1.lora_A.default.weight", "fc1.lora_B.default.weight"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(lora + trained_biases)
    saved = sorted(peftkit.adapter_state_dict(model))
    assert saved == sorted(["base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"]
                           + ["base_model.model." + b for b in trained_biases])
    n_bias = {"none": 0, "lora_only": 32, "all": 32 + 32 + 8}[bias]
    assert peftkit.count_parameters(model).trainable == 2 * 16 + 32 * 2 + n_bias


def test_bias_all_on_gpt2_includes_layernorm_biases(tiny_gpt2: Tiny) -> None:
    model = peftkit.inject(tiny_gpt2.build(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trained == all_biases
    assert {"transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.base_layer.bias"} <= trained


# -- other -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected", "count"),
    [
        ("llama", ["q_proj", "v_proj"], 4),
        ("gpt2", ["c_attn"], 2),
        ("bert", ["query", "value"], 4),
        ("t5", ["q", "v"], 12),  # encoder self-attention, decoder self- and cross-attention
        ("mlp", ["fc1", "fc2", "out"], 3),  # unknown family: all-linear
    ],
)
def test_default_targets_per_family(kind: str, expected: list[str], count: int) -> None:
    model = peftkit.inject(make_tiny(kind).build(), LoraConfig())
    targets = model.peftkit_state.targets["default"]
    assert sorted({t.split(".")[-1] for t in targets}) == sorted(expected)
    assert len(targets) == count


def test_adapter_stays_fp32_over_a_bf16_base(tiny_llama: Tiny) -> None:
    model = tiny_llama.build().to(torch.bfloat16)
    peftkit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16
    out = tiny_llama.run(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    w0 = q.base_layer.weight.detach().clone()
    peftkit.merge(model)
    assert q.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(q.base_layer.weight.float(), (w0.float() + q.delta_weight("default")), rtol=0, atol=1e-2)


def test_a_second_lora_on_a_wrapped_module_reuses_the_wrapper(tiny_mlp: Tiny) -> None:
    model = peftkit.inject(tiny_mlp.build(), LoraConfig(target_modules=["fc1"]))
    wrapper = model.fc1
    peftkit.inject(model, LoraConfig(r=2, target_modules=["fc1"]), adapter_name="b")
    assert model.fc1 is wrapper and wrapper.adapter_names() == ["default", "b"]
    assert isinstance(wrapper.base_layer, nn.Linear) and not isinstance(wrapper.base_layer, AdapterLayer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "method.r must be a positive integer, got 0"),
        ({"r": -2}, "method.r must be a positive integer"),
        ({"r": 2.5}, "method.r must be a positive integer"),
        ({"dropout": 1.0}, r"method.dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"method.dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "method.init must be kaiming, gaussian or random"),
        ({"bias": "some"}, "method.bias must be none, all or lora_only"),
        ({"rank_pattern": {"q_proj": 0}}, r"method.rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(peftkit.ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_config_round_trip(tiny_llama: Tiny) -> None:
    config = LoraConfig(r=6, alpha=3, dropout=0.1, target_modules="all-linear", use_rslora=True, init="gaussian",
                        bias="lora_only", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 5.0})
    model = peftkit.inject(tiny_llama.build(), config)
    back = LoraConfig.from_peft(config.to_peft(model, model.peftkit_state.targets["default"]))
    assert back == LoraConfig(r=6, alpha=3, dropout=0.1, target_modules=["down_proj", "gate_proj", "k_proj", "o_proj",
                                                                        "q_proj", "up_proj", "v_proj"],
                              use_rslora=True, init="gaussian", bias="lora_only", rank_pattern={"q_proj": 2},
                              alpha_pattern={"v_proj": 5.0})

