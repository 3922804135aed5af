"""Adapter files are interchangeable with Hugging Face PEFT, in both directions.

The real ``peft`` package is the oracle here (the product never imports it). Each case builds the same LoRA
in both tools on a tiny random Llama (GQA) or GPT-2 (Conv1D), saved with ``save_pretrained`` into a local
folder so that ``base_model_name_or_path`` is a local path and nothing looks for a hub:

1. peftkit ``save_adapter`` -> ``peft.PeftModel.from_pretrained`` on a fresh copy of the base: same logits;
2. peft ``get_peft_model`` + ``save_pretrained`` -> peftkit ``load_adapter``: same logits.

Adapters start random (``init="random"`` / ``init_lora_weights=False``) so the logits really differ from the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.methods.lora import LoraLayer
from tests.tiny import make_tiny, perturb_adapters

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One LoRA set-up, written for each tool (r=4, alpha=8 unless overridden)."""

    id: str
    kind: str
    ours: dict[str, Any]
    theirs: dict[str, Any] = field(default_factory=dict)  # defaults to ``ours`` with PEFT's field names

    def peftkit_config(self) -> peftkit.LoraConfig:
        return peftkit.LoraConfig(**{"r": 4, "alpha": 8, "init": "random", **self.ours})

    def peft_config(self) -> peft.LoraConfig:
        kw = dict(self.theirs) if self.theirs else {("lora_alpha" if k == "alpha" else k): v for k, v in self.ours.items()}
        kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}
        if self.kind == "gpt2":
            kw["fan_in_fan_out"] = True  # Conv1D
        return peft.LoraConfig(**kw)


QVO = ["q_proj", "v_proj", "o_proj"]
CASES = [
    Case("llama-qv", "llama", {"target_modules": ["q_proj", "v_proj"]}),
    Case("gpt2-c_attn", "gpt2", {"target_modules": ["c_attn"]}),
    Case("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    Case("gpt2-all-linear", "gpt2", {"target_modules": "all-linear"}),
    Case("llama-regex", "llama", {"target_modules": r".*\.layers\.1\..*_proj"}),
    Case("llama-rank-alpha-pattern", "llama", {"target_modules": "all-linear",
                                               "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                               "alpha_pattern": {"v_proj": 3.0, "down_proj": 20.0}}),
    Case("llama-rslora", "llama", {"target_modules": QVO, "r": 8, "alpha": 4, "use_rslora": True}),
    Case("gpt2-rslora-pattern", "gpt2",
         {"target_modules": ["c_attn", "c_fc"], "use_rslora": True, "rank_pattern": {"c_fc": 2}}),
    Case("llama-embedding", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    Case("llama-exclude-layers", "llama", {"target_modules": QVO, "exclude": ["o_proj"], "layers": [1]},
         {"target_modules": QVO, "exclude_modules": ["o_proj"], "layers_to_transform": [1]}),
    Case("llama-all-linear-exclude", "llama", {"target_modules": "all-linear", "exclude": ["o_proj", "gate_proj"]},
         {"target_modules": "all-linear", "exclude_modules": ["o_proj", "gate_proj"]}),
    Case("gpt2-layers", "gpt2", {"target_modules": ["c_attn", "c_proj"], "layers": [0]},
         {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": [0]}),
    Case("gpt2-bias-all", "gpt2", {"target_modules": ["c_attn", "c_fc"], "bias": "all"}),
    Case("gpt2-bias-lora_only", "gpt2", {"target_modules": ["c_attn"], "bias": "lora_only"}),
]


def lora_module_names(model: nn.Module) -> set[str]:
    """Names of the modules carrying LoRA in a peftkit or a PEFT model, without PEFT's prefix."""
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) or isinstance(mod, peft.tuners.lora.LoraLayer):
            names.add(name.removeprefix("base_model.model."))
    return names


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peftkit_adapter_loads_in_peft(case: Case, load_base, tmp_path: Path) -> None:
    tiny = make_tiny(case.kind)
    base_out = tiny.run(load_base(case.kind))
    model = peftkit.inject(load_base(case.kind), case.peftkit_config())
    perturb_adapters(model)  # LoRA weights and, with bias options, the trained biases
    ours = tiny.run(model)
    assert (ours - base_out).abs().max() > 1e-2
    peftkit.save_adapter(model, tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(load_base(case.kind), tmp_path / "adapter").eval()
    assert lora_module_names(theirs) == lora_module_names(model)
    torch.testing.assert_close(tiny.run(theirs), ours, rtol=0, atol=ATOL)
    # PEFT reads back exactly the tensors we wrote
    their_sd = peft.get_peft_model_state_dict(theirs)
    for key, tensor in peftkit.adapter_state_dict(model).items():
        assert torch.equal(their_sd[key], tensor), key


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peft_adapter_loads_in_peftkit(case: Case, load_base, tmp_path: Path) -> None:
    tiny = make_tiny(case.kind)
    base_out = tiny.run(load_base(case.kind))
    theirs = peft.get_peft_model(load_base(case.kind), case.peft_config()).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and name.endswith(".bias"):  # trained biases move away from the base too
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    expected = tiny.run(theirs)
    assert (expected - base_out).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "adapter")

    model = peftkit.load_adapter(load_base(case.kind), tmp_path / "adapter")
    assert lora_module_names(model) == lora_module_names(theirs)
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)


def test_saved_keys_match_peft(load_base) -> None:
    case = Case("all", "llama", {"target_modules": "all-linear", "rank_pattern": {"k_proj": 2}})
    ours = peftkit.inject(load_base("llama"), case.peftkit_config())
    theirs = peft.get_peft_model(load_base("llama"), case.peft_config())
    their_sd = peft.get_peft_model_state_dict(theirs)
    our_sd = peftkit.adapter_state_dict(ours)
    assert sorted(our_sd) == sorted(their_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in their_sd.items()}


def test_peft_writes_config_fields_we_do_not_use(load_base, tmp_path: Path) -> None:
    # PEFT's adapter_config.json carries many fields peftkit has no use for; loading ignores them
    theirs = peft.get_peft_model(load_base("llama"), Case("x", "llama", {"target_modules": ["q_proj"]}).peft_config())
    theirs.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(cfg) > 20 and "megatron_config" in cfg
    model = peftkit.load_adapter(load_base("llama"), tmp_path / "adapter")
    config = model.peftkit_state.configs["default"]
    assert (config.r, config.alpha, config.init, config.target_modules) == (4, 8.0, "random", ["q_proj"])


def test_merged_models_agree(load_base, tmp_path: Path) -> None:
    case = Case("merge", "llama", {"target_modules": "all-linear", "rank_pattern": {"q_proj": 2}})
    theirs = peft.get_peft_model(load_base("llama"), case.peft_config())
    theirs.save_pretrained(tmp_path / "adapter")
    ours = peftkit.unload(peftkit.load_adapter(load_base("llama"), tmp_path / "adapter"), merge=True)
    their_merged = theirs.merge_and_unload()
    our_sd, their_sd = ours.state_dict(), their_merged.state_dict()
    assert sorted(our_sd) == sorted(their_sd)
    for key, w in their_sd.items():
        torch.testing.assert_close(our_sd[key], w, rtol=0, atol=1e-6, msg=key)
