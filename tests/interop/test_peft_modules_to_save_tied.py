"""Issue #23 item 12: LoRA adapters with ``modules_to_save: [lm_head]`` on a model whose head is tied to its input
embeddings (tiny GPT-2). PEFT trains and saves a copy of the head, and the input embedding stays the base's;
peftkit unties the head the same way, so adapters go both ways with the same logits. ``peft`` is the oracle."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.errors import AdapterFileError
from tests.tiny import make_tiny, perturb_adapters

IDS = make_tiny("gpt2").inputs["input_ids"]


def base(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_adapter(folder, out, **extra):
    model = peft.get_peft_model(base(folder), peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False, modules_to_save=["lm_head"],
        **extra))
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    model.save_pretrained(out)
    return logits(model)


def test_peft_adapter_with_tied_head_in_modules_to_save_loads_as_in_peft(hf_base_dir, tmp_path):
    folder = hf_base_dir("gpt2")
    expected = peft_adapter(folder, tmp_path / "ad")
    reloaded = peft.PeftModel.from_pretrained(base(folder), tmp_path / "ad")  # PEFT's own load: the same
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)

    model = base(folder)
    wte = model.transformer.wte.weight.detach().clone()
    peftkit.load_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    # the saved head replaced the head only: the input embedding is still the base's
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte) and not torch.equal(model.lm_head.weight, wte)
    assert model.config.tie_word_embeddings is False

    # a merged export keeps the adapter's head (the config no longer re-ties it on load)
    merged = peftkit.unload(model, merge=True)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_peftkit_adapter_with_tied_head_in_modules_to_save_loads_in_peft(hf_base_dir, tmp_path):
    folder = hf_base_dir("gpt2")
    model = base(folder)
    wte = model.transformer.wte.weight.detach().clone()
    before = logits(model)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # untying alone changes nothing
    names = [k for k, _ in peftkit.core.adapter.adapter_parameters(model)]
    assert "lm_head.weight" in names and "transformer.wte.weight" not in names
    perturb_adapters(model)
    assert torch.equal(model.transformer.wte.weight, wte)  # training the head leaves the embedding alone
    ours = logits(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]

    theirs = peft.PeftModel.from_pretrained(base(folder), tmp_path / "ad")
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    again = base(folder)
    peftkit.load_adapter(again, tmp_path / "ad", strict_base=True)  # the recorded base is the tied one
    torch.testing.assert_close(logits(again), ours, rtol=0, atol=0)


def test_ensure_weight_tying_with_modules_to_save_is_refused_by_name(hf_base_dir, tmp_path):
    folder = hf_base_dir("gpt2")
    peft_adapter(folder, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    config["ensure_weight_tying"] = True
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    model = base(folder)
    with pytest.raises(AdapterFileError, match="'ensure_weight_tying' with 'modules_to_save'"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert model.lm_head.weight is model.transformer.wte.weight  # left as it was
