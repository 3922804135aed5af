"""Selective methods (selective, BitFit, linear probing, full fine-tuning): base parameters trained in place."""

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError, PeftkitError
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.full import FullConfig
from peftkit.methods.linear_probe import LinearProbeConfig
from peftkit.methods.selective import SelectiveConfig
from tests.tiny import HIDDEN, VOCAB


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_norm_tuning_selects_exactly_the_norms(tiny_llama):
    model = peftkit.inject(tiny_llama.build(), SelectiveConfig(kinds=["norm"]))
    # 2 layers x (input_layernorm, post_attention_layernorm) + final norm
    assert trainable(model) == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                                "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                                "model.norm.weight"]
    assert peftkit.count_parameters(model).trainable == 5 * HIDDEN


def test_last_layer_and_kind_intersection(tiny_llama):
    model = peftkit.inject(tiny_llama.build(), SelectiveConfig(layers=[-1], kinds=["attention"]))
    names = trainable(model)
    assert names and all(n.startswith("model.layers.1.self_attn.") for n in names)
    assert len(names) == 4  # q, k, v, o weights (Llama has no biases)


def test_patterns_regex(tiny_gpt2):
    model = peftkit.inject(tiny_gpt2.build(), SelectiveConfig(patterns=r".*\.h\.0\.attn\.c_attn\..*"))
    assert trainable(model) == ["transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_attn.weight"]


def test_selection_errors(tiny_llama):
    with pytest.raises(ConfigError, match="needs at least one of patterns, layers, kinds"):
        SelectiveConfig()
    with pytest.raises(ConfigError, match="'gate' is not one of"):
        SelectiveConfig(kinds=["gate"])
    with pytest.raises(ConfigError, match="matches no parameter; the model has 2 layers"):
        peftkit.inject(tiny_llama.build(), SelectiveConfig(patterns=["nope"]))


def test_bitfit_biases_only_and_llama_message(tiny_gpt2, tiny_llama):
    model = peftkit.inject(tiny_gpt2.build(), BitFitConfig())
    names = trainable(model)
    assert names and all(n.endswith("bias") for n in names)
    assert len(names) == len([n for n, _ in tiny_gpt2.build().named_parameters() if n.endswith("bias")])
    with pytest.raises(ConfigError, match=r"this model \(llama\) has none .* use lora, ia3, or selective"):
        peftkit.inject(tiny_llama.build(), BitFitConfig())


def test_linear_probe_trains_head_only(tiny_llama, tiny_gpt2):
    model = peftkit.inject(tiny_llama.build(), LinearProbeConfig())
    assert trainable(model) == ["lm_head.weight"]
    # GPT-2's head is tied to wte: the shared matrix is what trains
    model = peftkit.inject(tiny_gpt2.build(), LinearProbeConfig())
    assert trainable(model) == ["transformer.wte.weight"]
    assert peftkit.count_parameters(model).trainable == VOCAB * HIDDEN


def test_full_trains_everything(tiny_llama):
    model = peftkit.inject(tiny_llama.build(), FullConfig())
    c = peftkit.count_parameters(model)
    assert c.trainable == c.total


@pytest.mark.parametrize("config", [SelectiveConfig(kinds=["norm", "head"]), LinearProbeConfig(), FullConfig()],
                         ids=["selective", "linear_probe", "full"])
def test_save_load_round_trip_into_fresh_base(config, tiny_llama, tmp_path):
    model = peftkit.inject(tiny_llama.build(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = tiny_llama.run(model)
    assert (out - tiny_llama.run(tiny_llama.build())).abs().max() > 1e-3
    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_adapter(tiny_llama.build(), tmp_path / "a")
    torch.testing.assert_close(tiny_llama.run(fresh), out, atol=1e-6, rtol=0)
    import json

    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == config.peft_type


def test_disable_refuses_for_in_place_methods(tiny_gpt2):
    model = peftkit.inject(tiny_gpt2.build(), BitFitConfig())
    with pytest.raises(PeftkitError, match="trains the base weights in place"):
        with peftkit.disable_adapters(model):
            pass


def test_full_fine_tuning_learns(tiny_lm, tmp_path):
    from peftkit.data.template import Template
    from peftkit.data.tokenize import encode_all
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Batching, Trainer, Wiring
    from peftkit.train.loss import evaluate_loss

    model, tok = tiny_lm
    peftkit.inject(model, FullConfig())
    rows = [{"instruction": "Say the color of grass", "output": "green"}] * 8
    data = encode_all(Template.create(tok), rows, 64).examples
    before = evaluate_loss(model, data, 8, tok.pad_token_id)
    Trainer(model, data, [], TrainConfig(max_steps=10, batch_size=8, lr=1e-2, warmup_steps=0, save_every=0,
                                         eval_every=0), Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    assert evaluate_loss(model, data, 8, tok.pad_token_id) < before - 5


def test_unload_without_merge_refuses_for_in_place(tiny_gpt2):
    model = peftkit.inject(tiny_gpt2.build(), BitFitConfig())
    with pytest.raises(ConfigError, match="cannot give the original base back"):
        peftkit.unload(model)
    tuned = tiny_gpt2.run(model)
    plain = peftkit.unload(model, merge=True)
    torch.testing.assert_close(tiny_gpt2.run(plain), tuned, rtol=0, atol=0)
