"""(IA)³, DoRA and LLaMA-Adapter files are interchangeable with Hugging Face PEFT, in both directions.

As in test_peft_interop.py, the real ``peft`` package is the oracle: each case builds the same adapter in
both tools on a tiny random Llama (grouped-query attention) or GPT-2 (Conv1D), and checks

1. peftkit ``save_adapter`` -> ``peft.PeftModel.from_pretrained``: same logits, same tensors;
2. peft ``get_peft_model`` + ``save_pretrained`` -> peftkit ``load_adapter``: same logits;
3. for mergeable methods, peftkit's merged weights equal PEFT's ``merge_and_unload``.

Adapters start random in both tools (peftkit: ``perturb_adapters``; PEFT: its non-identity inits, and a
non-zero gate for adaption prompts) so the logits really differ from the base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.config import MethodConfig
from peftkit.methods.dora import DoraConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from tests.tiny import make_tiny, perturb_adapters

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One adapter set-up, written for each tool."""

    id: str
    kind: str
    ours: Callable[[], MethodConfig]
    theirs: Callable[[], peft.PeftConfig]
    mergeable: bool = True


def lora_kw(kind: str, **kw) -> dict:
    return {"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False, "fan_in_fan_out": kind == "gpt2", **kw}


CASES = [
    # -- (IA)³ -------------------------------------------------------------------------------------
    Case("ia3-llama-defaults", "llama", lambda: IA3Config(), lambda: peft.IA3Config(init_ia3_weights=False)),
    Case("ia3-llama-custom", "llama",
         lambda: IA3Config(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=["o_proj", "up_proj"]),
         lambda: peft.IA3Config(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=["o_proj", "up_proj"],
                                init_ia3_weights=False)),
    Case("ia3-llama-regex", "llama",
         lambda: IA3Config(target_modules=r".*\.layers\.1\..*_proj", feedforward_modules=r".*mlp\.(up|gate)_proj"),
         lambda: peft.IA3Config(target_modules=r".*\.layers\.1\..*_proj",
                                feedforward_modules=r".*mlp\.(up|gate)_proj", init_ia3_weights=False)),
    Case("ia3-gpt2-defaults", "gpt2", lambda: IA3Config(),
         lambda: peft.IA3Config(init_ia3_weights=False, fan_in_fan_out=True)),
    # (PEFT writes "all-linear" out as suffixes that break its own subset rule, so it cannot reload that file)
    Case("ia3-gpt2-every-linear", "gpt2",
         lambda: IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"]),
         lambda: peft.IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"],
                                init_ia3_weights=False, fan_in_fan_out=True)),
    # -- DoRA ----------------------------------------------------------------------------------------
    Case("dora-llama-qv", "llama", lambda: DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
         lambda: peft.LoraConfig(**lora_kw("llama", target_modules=["q_proj", "v_proj"]))),
    Case("dora-llama-all-linear-embedding", "llama",
         lambda: DoraConfig(r=4, alpha=8, target_modules=r".*(_proj|embed_tokens)", rank_pattern={"k_proj": 2}),
         lambda: peft.LoraConfig(**lora_kw("llama", target_modules=r".*(_proj|embed_tokens)", rank_pattern={"k_proj": 2}))),
    Case("dora-llama-rslora-layers", "llama",
         lambda: DoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj"], layers=[1]),
         lambda: peft.LoraConfig(**lora_kw("llama", r=8, lora_alpha=4, use_rslora=True,
                                           target_modules=["o_proj", "down_proj"], layers_to_transform=[1]))),
    Case("dora-gpt2", "gpt2", lambda: DoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]),
         lambda: peft.LoraConfig(**lora_kw("gpt2", target_modules=["c_attn", "c_fc"]))),
    # -- LLaMA-Adapter (PEFT's adaption prompts) ----------------------------------------------------------
    Case("llama-adapter-gqa-top1", "llama", lambda: LlamaAdapterConfig(adapter_len=3, adapter_layers=1),
         lambda: peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"), mergeable=False),
    Case("llama-adapter-gqa-all", "llama", lambda: LlamaAdapterConfig(adapter_len=5, adapter_layers=2),
         lambda: peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM"), mergeable=False),
    Case("llama-adapter-gpt2", "gpt2", lambda: LlamaAdapterConfig(adapter_len=4, adapter_layers=2),
         lambda: peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"), mergeable=False),
]


def adapter_modules(model: nn.Module) -> set[str]:
    """Module names holding adapter tensors, in a peftkit or a PEFT model, without PEFT's prefix."""
    names = set()
    for name, _ in model.named_parameters():
        parts = name.removeprefix("base_model.model.").split(".")
        for i, p in enumerate(parts):
            if p.startswith(("lora_", "ia3_", "adaption_")):
                names.add(".".join(parts[:i]))
                break
    return names


def randomize_peft(model: nn.Module) -> None:
    """PEFT's adaption prompts start with a zero gate (the base model): open the gates."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peftkit_adapter_loads_in_peft(case: Case, load_base, tmp_path: Path) -> None:
    tiny = make_tiny(case.kind)
    base_out = tiny.run(load_base(case.kind))
    model = peftkit.inject(load_base(case.kind), case.ours())
    perturb_adapters(model, std=0.5)
    ours = tiny.run(model)
    assert (ours - base_out).abs().max() > 1e-2
    peftkit.save_adapter(model, tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(load_base(case.kind), tmp_path / "adapter").eval()
    assert adapter_modules(theirs) == adapter_modules(model)
    torch.testing.assert_close(tiny.run(theirs), ours, rtol=0, atol=ATOL)
    their_sd = peft.get_peft_model_state_dict(theirs)
    for key, tensor in peftkit.adapter_state_dict(model).items():
        assert torch.equal(their_sd[key], tensor), key


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peft_adapter_loads_in_peftkit(case: Case, load_base, tmp_path: Path) -> None:
    tiny = make_tiny(case.kind)
    base_out = tiny.run(load_base(case.kind))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base(case.kind), case.theirs()).eval()
    randomize_peft(theirs)
    expected = tiny.run(theirs)
    assert (expected - base_out).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "adapter")

    model = peftkit.load_adapter(load_base(case.kind), tmp_path / "adapter")
    assert type(model.peftkit_state.configs["default"]) is type(case.ours())
    assert adapter_modules(model) == adapter_modules(theirs)
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)
    if case.mergeable:  # and the merged models agree
        their_merged = theirs.merge_and_unload().state_dict()
        our_merged = peftkit.unload(model, merge=True).state_dict()
        assert sorted(our_merged) == sorted(their_merged)
        for key, w in their_merged.items():
            torch.testing.assert_close(our_merged[key], w, rtol=0, atol=1e-6, msg=key)


def test_llama_adapter_generation_matches_peft(load_base, tmp_path: Path) -> None:
    # greedy generation with the KV cache gives PEFT's tokens
    model = peftkit.inject(load_base("llama"), LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    perturb_adapters(model, std=1.0)
    peftkit.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_base("llama"), tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False,
          "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), theirs.generate(**kw))


def test_ia3_all_linear_file_loads_in_peft(load_base, tmp_path: Path) -> None:
    # peftkit writes the exact modules, with feedforward_modules a subset of target_modules as PEFT requires
    tiny = make_tiny("gpt2")
    model = peftkit.inject(load_base("gpt2"), IA3Config(target_modules="all-linear"))
    perturb_adapters(model, std=0.5)
    peftkit.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_base("gpt2"), tmp_path / "adapter").eval()
    ff = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
          if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward}
    assert ff == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    torch.testing.assert_close(tiny.run(theirs), tiny.run(model), rtol=0, atol=ATOL)
