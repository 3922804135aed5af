"""``train.optimizer``: 8-bit / paged AdamW states on CUDA with bitsandbytes; elsewhere a note and torch AdamW."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.runs.config import load_config
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, Wiring
from peftkit.train.loss import evaluate_loss
from peftkit.train.optim import make_optimizer
from tests.train.test_loop import encoded


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_cpu_falls_back_to_torch_adamw_with_one_line_note(tiny_llama, name):
    model = _lora(tiny_llama.build())
    with pytest.warns(UserWarning) as caught:
        opt = make_optimizer(model, TrainConfig(optimizer=name, lr=1e-3))
    messages = [str(w.message) for w in caught if f"train.optimizer={name}" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "need CUDA with bitsandbytes" in messages[0] and "using torch AdamW" in messages[0]
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-3
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_default_optimizer_says_nothing(tiny_llama, recwarn):
    opt = make_optimizer(_lora(tiny_llama.build()), TrainConfig())
    assert type(opt) is torch.optim.AdamW
    assert not [w for w in recwarn if "train.optimizer" in str(w.message)]


def test_training_proceeds_after_the_fallback(tiny_lm, tmp_path):
    model, tok = tiny_lm
    _lora(model)
    data = encoded(tok)
    before = evaluate_loss(model, data, 8, tok.pad_token_id)
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=3e-2, warmup_steps=0, eval_every=0, save_every=0,
                      optimizer="paged_adamw_8bit")
    with pytest.warns(UserWarning, match="train.optimizer=paged_adamw_8bit"):
        state = Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    assert state.step == 12
    assert evaluate_loss(model, data, 8, tok.pad_token_id) < before - 1


def test_unknown_optimizer_names_the_field():
    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=lion"])
    assert load_config(None, ["train.optimizer=adamw_8bit"]).train.optimizer == "adamw_8bit"
