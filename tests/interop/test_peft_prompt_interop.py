"""Soft-prompt adapter files are interchangeable with Hugging Face PEFT, in both directions.

The real ``peft`` package is the oracle (the product never imports it). Each case builds the same soft prompt
in both tools on a tiny random Llama (GQA: 4 query heads, 2 key/value heads), GPT-2 or T5, saved with
``save_pretrained`` into a local folder:

1. peftkit ``save_adapter`` -> ``peft.PeftModel.from_pretrained`` on a fresh copy of the base: same logits;
2. peft ``get_peft_model`` + ``save_pretrained`` -> peftkit ``load_adapter``: same logits.

PEFT's logits for prompt tuning and P-tuning cover the virtual tokens too; peftkit's are aligned with the
caller's tokens, so they are compared with PEFT's last T positions. Prefix tuning on T5 is left out: PEFT's
encoder-decoder prefixes reuse rows across decoder layers, which peftkit does not reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import peftkit
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from tests.tiny import make_tiny, perturb_adapters

ATOL = 1e-5
N = 4


@dataclass(frozen=True)
class Case:
    """One soft prompt, written for each tool."""

    id: str
    kind: str
    ours: Callable[[], Any]
    theirs: Callable[[str], Any]  # task_type -> PEFT config

    @property
    def prefix(self) -> bool:
        return isinstance(self.ours(), PrefixTuningConfig)


def _pt(task: str) -> peft.PromptTuningConfig:
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)


def _ptune(task: str, **kw: Any) -> peft.PromptEncoderConfig:
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16, **kw)


def _prefix(task: str, **kw: Any) -> peft.PrefixTuningConfig:
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N, **kw)


CASES = [
    case
    for kind in ("llama", "gpt2")
    for case in (
        Case(f"{kind}-prompt_tuning", kind, lambda: PromptTuningConfig(num_virtual_tokens=N), _pt),
        Case(f"{kind}-p_tuning-mlp", kind, lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16), _ptune),
        Case(f"{kind}-p_tuning-lstm", kind,
             lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
             lambda task: _ptune(task, encoder_reparameterization_type="LSTM")),
        Case(f"{kind}-prefix", kind, lambda: PrefixTuningConfig(num_virtual_tokens=N), _prefix),
        Case(f"{kind}-prefix-projection", kind,
             lambda: PrefixTuningConfig(num_virtual_tokens=N, projection=True, encoder_hidden_size=16),
             lambda task: _prefix(task, prefix_projection=True, encoder_hidden_size=16)),
    )
] + [
    Case("t5-prompt_tuning", "t5", lambda: PromptTuningConfig(num_virtual_tokens=N), _pt),
    Case("t5-p_tuning-mlp", "t5", lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16), _ptune),
]


@pytest.fixture
def load_base(hf_base_dir: Callable[[str], Path]) -> Callable[[str], nn.Module]:
    def load(kind: str) -> nn.Module:
        auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        return auto.from_pretrained(hf_base_dir(kind)).eval()

    return load


def task_type(kind: str) -> str:
    return "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"


def peft_logits(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's logits for the caller's tokens (its prompt-tuning logits include the virtual positions)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    if case.kind == "t5" or case.prefix:
        return logits
    return logits[:, -inputs["input_ids"].shape[1]:]


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
    torch.testing.assert_close(peft_logits(case, theirs, tiny.inputs), ours, rtol=0, atol=ATOL)
    # PEFT reads back exactly the tensor we wrote
    their_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = peftkit.adapter_state_dict(model)
    assert sorted(their_sd) == sorted(ours_sd) == ["prompt_embeddings"]
    assert torch.equal(their_sd["prompt_embeddings"], ours_sd["prompt_embeddings"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peft_adapter_loads_in_peftkit(case: Case, load_base, tmp_path: Path) -> None:
    tiny = make_tiny(case.kind)
    base_out = tiny.run(load_base(case.kind))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base(case.kind), case.theirs(task_type(case.kind))).eval()
    expected = peft_logits(case, theirs, tiny.inputs)
    assert (expected - base_out).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "adapter")

    model = peftkit.load_adapter(load_base(case.kind), tmp_path / "adapter")
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)
    assert type(model.peftkit_state.configs["default"]) is type(case.ours())
    assert model.peftkit_state.configs["default"].num_virtual_tokens == N


def test_peft_t5_files_with_two_submodules_load(load_base, tmp_path: Path) -> None:
    # PEFT sizes encoder-decoder prompts for 2 "transformer submodules" (2N rows) and uses the first N
    theirs = peft.get_peft_model(load_base("t5"), _pt("SEQ_2_SEQ_LM"))
    theirs.save_pretrained(tmp_path / "adapter")
    assert load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"].shape[0] == 2 * N
    model = peftkit.load_adapter(load_base("t5"), tmp_path / "adapter")
    assert peftkit.adapter_state_dict(model)["prompt_embeddings"].shape[0] == N


def test_loss_with_labels_equals_peft(load_base, tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base("llama"), _pt("CAUSAL_LM")).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = peftkit.load_adapter(load_base("llama"), tmp_path / "adapter")
    ids = make_tiny("llama").inputs["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, labels=ids).loss
        got = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix"])
def test_greedy_generation_equals_peft(variant: str, load_base, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = _pt("CAUSAL_LM") if variant == "prompt_tuning" else _prefix("CAUSAL_LM")
    theirs = peft.get_peft_model(load_base("llama"), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = peftkit.load_adapter(load_base("llama"), tmp_path / "adapter")
    ids = make_tiny("llama").inputs["input_ids"]  # no padding: PEFT's prompt-tuning positions ignore it
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, **kw)
        got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got[:, ids.shape[1]:], expected[:, -6:])


def test_file_with_the_encoder_still_loads_in_peft(load_base, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = peftkit.inject(load_base("llama"), PTuningConfig(num_virtual_tokens=N, save_encoder=True))
    perturb_adapters(model, std=0.5)
    ours = tiny.run(model)
    peftkit.save_adapter(model, tmp_path / "adapter")
    assert len(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) > 1
    theirs = peft.PeftModel.from_pretrained(load_base("llama"), tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_logits(CASES[1], theirs, tiny.inputs), ours, rtol=0, atol=ATOL)
