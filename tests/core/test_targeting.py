"""Which modules a target spec selects (PEFT's rules), and what the errors say when it selects none."""

from __future__ import annotations

import pytest
import torch.nn as nn

import peftkit
from peftkit.core.targeting import compact_targets, find_targets, layer_index, name_matches, output_head_names
from tests.tiny import Tiny, adapter_layer_names

LLAMA_LAYER0_ATTN = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
LLAMA_LAYER0_MLP = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
LLAMA_LAYER0 = LLAMA_LAYER0_ATTN + LLAMA_LAYER0_MLP
LLAMA_LINEAR = LLAMA_LAYER0 + [n.replace(".0.", ".1.") for n in LLAMA_LAYER0]  # model order


# -- name rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),  # suffix after a dot
        ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),  # exact name
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),  # dotted suffix
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix must start at a dot
        ("model.layers.0.self_attn.q_proj", ["attn.q"], False),
        ("q_proj", ["q_proj"], True),  # top-level module
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # a string is a regex over the WHOLE name
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
        ("model.layers.0.self_attn.q_proj", r".*layers\.1.*", False),
        ("model.layers.0.self_attn.q_proj", None, False),
        ("model.layers.0.self_attn.q_proj", [], False),
    ],
)
def test_name_matches_follows_peft_rules(name: str, spec, expected: bool) -> None:
    assert name_matches(name, spec) is expected


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.3.self_attn.q_proj", 3),  # Llama
        ("transformer.h.12.attn.c_attn", 12),  # GPT-2
        ("encoder.layer.1.attention.self.query", 1),  # BERT
        ("encoder.block.1.layer.0.SelfAttention.q", 1),  # T5: the block index, not the sub-layer's
        ("decoder.block.0.layer.2.DenseReluDense.wi", 0),
        ("model.layers.7", 7),
        ("lm_head", None),
        ("model.embed_tokens", None),
        ("fc1", None),
    ],
)
def test_layer_index(name: str, index: int | None) -> None:
    assert layer_index(name) == index


# -- find_targets on real architectures -----------------------------------------------------------


def test_suffix_list_selects_every_layer(tiny_llama: Tiny) -> None:
    names = find_targets(tiny_llama.build(), ["q_proj", "v_proj"])
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_exact_name_selects_one_module(tiny_llama: Tiny) -> None:
    assert find_targets(tiny_llama.build(), ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]


def test_regex_string_is_matched_against_the_whole_name(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    assert find_targets(model, r".*\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, r".*mlp\..*") == [n for n in LLAMA_LINEAR if ".mlp." in n]
    with pytest.raises(peftkit.ConfigError, match="matched no module"):
        find_targets(model, "q_proj")  # a bare string is a regex: it must match the whole name


def test_all_linear_llama_excludes_lm_head_and_embeddings(tiny_llama: Tiny) -> None:
    assert find_targets(tiny_llama.build(), "all-linear") == LLAMA_LINEAR


def test_all_linear_gpt2_takes_conv1d_and_not_the_head(tiny_gpt2: Tiny) -> None:
    names = find_targets(tiny_gpt2.build(), "all-linear")
    expected = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert names == expected
    assert "lm_head" not in names


def test_all_linear_t5_excludes_lm_head(tiny_t5: Tiny) -> None:
    names = find_targets(tiny_t5.build(), "all-linear")
    assert "lm_head" not in names
    # encoder: 2 blocks x (q, k, v, o, wi, wo); decoder: 2 blocks x (self q, k, v, o, cross q, k, v, o, wi, wo)
    assert len(names) == 2 * 6 + 2 * 10
    assert {n.split(".")[-1] for n in names} == {"q", "k", "v", "o", "wi", "wo"}


def test_all_linear_bert_takes_every_linear(tiny_bert: Tiny) -> None:
    names = find_targets(tiny_bert.build(), "all-linear")
    assert len(names) == 2 * 6 + 1  # per layer: query, key, value, attention.output.dense, intermediate, output; + pooler
    assert "pooler.dense" in names


def test_all_linear_plain_module(tiny_mlp: Tiny) -> None:
    # no get_output_embeddings and no head-like name: every linear layer is a target
    assert find_targets(tiny_mlp.build(), "all-linear") == ["fc1", "fc2", "out"]


def test_output_head_names() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("classifier", nn.Linear(4, 2))
    assert output_head_names(model) == {"classifier"}
    assert find_targets(model, "all-linear") == ["body"]


def test_embeddings_are_targets_by_name(tiny_llama: Tiny) -> None:
    assert find_targets(tiny_llama.build(), ["embed_tokens"]) == ["model.embed_tokens"]


def test_exclude_list(tiny_llama: Tiny) -> None:
    names = find_targets(tiny_llama.build(), "all-linear", exclude=["o_proj", "mlp.down_proj"])
    assert names == [n for n in LLAMA_LINEAR if not n.endswith(("o_proj", "down_proj"))]


def test_exclude_regex(tiny_llama: Tiny) -> None:
    names = find_targets(tiny_llama.build(), ["q_proj", "v_proj"], exclude=r".*\.layers\.0\..*")
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_layers(tiny_llama: Tiny, tiny_gpt2: Tiny) -> None:
    assert find_targets(tiny_llama.build(), ["q_proj", "v_proj"], layers=[1]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(tiny_gpt2.build(), "all-linear", layers=[0]) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
    ]
    # a module outside any block (the embedding) is not in "layer 0"
    assert find_targets(tiny_llama.build(), ["embed_tokens", "q_proj"], layers=[0]) == ["model.layers.0.self_attn.q_proj"]


def test_exclude_and_layers_together(tiny_llama: Tiny) -> None:
    names = find_targets(tiny_llama.build(), "all-linear", exclude=["o_proj"], layers=[1])
    assert names == [n for n in LLAMA_LINEAR if ".1." in n and not n.endswith("o_proj")]


def test_wrapped_module_counts_as_its_base_layer(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules="all-linear"))
    # lora_A.default / lora_B.default are nn.Linear too, but never targets; the wrapped layers still are
    assert find_targets(model, "all-linear") == LLAMA_LINEAR
    assert find_targets(model, ["q_proj"]) == [n for n in LLAMA_LINEAR if n.endswith("q_proj")]


# -- errors ----------------------------------------------------------------------------------------


def test_target_matching_nothing_lists_available_names(tiny_llama: Tiny) -> None:
    with pytest.raises(peftkit.ConfigError) as err:
        find_targets(tiny_llama.build(), ["query", "value"])
    msg = str(err.value)
    assert "['query', 'value']" in msg and "matched no module" in msg
    for available in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                      "lm_head"):
        assert available in msg
    assert "input_layernorm" not in msg  # only modules that could be targets are listed


def test_target_of_wrong_kind_matches_nothing(tiny_llama: Tiny) -> None:
    # a norm layer is neither linear nor an embedding
    with pytest.raises(peftkit.ConfigError, match="matched no module.*available module names: .*q_proj"):
        find_targets(tiny_llama.build(), ["input_layernorm"])


@pytest.mark.parametrize("empty", [[], "", None])
def test_empty_target_list(tiny_llama: Tiny, empty) -> None:
    with pytest.raises(peftkit.ConfigError, match="target_modules is empty"):
        find_targets(tiny_llama.build(), empty)


def test_exclude_removing_everything_says_so(tiny_llama: Tiny) -> None:
    with pytest.raises(peftkit.ConfigError, match=r"matched no module \(exclude=\['q_proj'\]\)"):
        find_targets(tiny_llama.build(), ["q_proj"], exclude=["q_proj"])


def test_layers_out_of_range_says_so(tiny_llama: Tiny) -> None:
    with pytest.raises(peftkit.ConfigError, match=r"matched no module in layers \[5, 7\]"):
        find_targets(tiny_llama.build(), ["q_proj"], layers=[7, 5])


def test_inject_with_bad_target_leaves_model_untouched(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    with pytest.raises(peftkit.ConfigError, match="available module names"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["nope"]))
    assert adapter_layer_names(model) == []
    assert not hasattr(model, "peftkit_state")
    assert all(p.requires_grad for p in model.parameters())


# -- compact_targets (what saved configs list) -----------------------------------------------------


def test_compact_targets_prefers_suffixes(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    targets = model.peftkit_state.targets["default"]
    assert compact_targets(model, targets) == ["q_proj", "v_proj"]


def test_compact_targets_falls_back_to_full_names(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["q_proj", "v_proj"], layers=[0]))
    targets = model.peftkit_state.targets["default"]
    # suffixes would also select layer 1: the exact names are kept
    assert compact_targets(model, targets) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
