"""P-tuning's encoder: peftkit's residual default (starts at the initial vectors) and PEFT's plain encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.p_tuning import PromptEncoder, PTuningConfig
from tests.tiny import make_tiny, perturb_adapters

N = 4


def encoder_of(model: torch.nn.Module) -> PromptEncoder:
    return model.get_input_embeddings().prompt_encoder["default"]


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_residual_encoder_starts_at_sampled_vocabulary_embeddings(kind: str) -> None:
    torch.manual_seed(0)
    model = peftkit.inject(make_tiny("llama").build(), PTuningConfig(num_virtual_tokens=N, encoder=kind,
                                                                      encoder_hidden_size=8))
    enc = encoder_of(model)
    vocab = model.get_input_embeddings().base_layer.weight  # (V, d)
    prompt = enc()  # (N, d)
    torch.testing.assert_close(prompt, enc.embedding.weight, rtol=0, atol=0)
    # every virtual token is one of the vocabulary's embeddings (init="vocab")
    assert bool((prompt[:, None, :] == vocab[None]).all(-1).any(-1).all())


def test_residual_adds_the_encoder_correction() -> None:
    model = peftkit.inject(make_tiny("llama").build(), PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8))
    perturb_adapters(model, std=0.3)
    enc = encoder_of(model)
    z = enc.embedding.weight
    torch.testing.assert_close(enc(), z + enc.mlp_head(z.unsqueeze(0))[0], rtol=0, atol=1e-6)


def test_plain_encoder_is_pefts_mlp_of_random_inputs() -> None:
    model = peftkit.inject(make_tiny("llama").build(),
                           PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8, residual=False, init="random"))
    enc = encoder_of(model)
    z = enc.embedding.weight
    assert float(enc.mlp_head[-1].weight.abs().sum()) > 0  # not zero-initialised
    torch.testing.assert_close(enc(), enc.mlp_head(z.unsqueeze(0))[0], rtol=0, atol=0)


def test_residual_flag_round_trips_only_with_the_encoder(tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = peftkit.inject(tiny.build(), PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8, save_encoder=True))
    perturb_adapters(model, std=0.3)
    peftkit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peftkit_residual"] is True
    loaded = peftkit.load_adapter(tiny.build(), tmp_path / "a")
    assert encoder_of(loaded).residual
    torch.testing.assert_close(tiny.run(loaded), tiny.run(model), rtol=0, atol=1e-6)

    model.peftkit_state.configs["default"].save_encoder = False
    peftkit.save_adapter(model, tmp_path / "b")  # a plain table: nothing peftkit-specific in the config
    assert "peftkit_residual" not in json.loads((tmp_path / "b" / "adapter_config.json").read_text())


def test_pefts_config_means_the_plain_encoder() -> None:
    cfg = PTuningConfig.from_peft({"peft_type": "P_TUNING", "num_virtual_tokens": 8,
                                   "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 16})
    assert cfg.residual is False and cfg.init == "random"


@pytest.mark.parametrize("fields, message", [
    ({"init": "words"}, "method.init"),
    ({"init": "text"}, "method.init_text"),
    ({"residual": "yes"}, "method.residual"),
])
def test_bad_settings_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PTuningConfig(**fields)
