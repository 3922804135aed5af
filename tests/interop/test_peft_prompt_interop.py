"""Soft-prompt adapter files are interchangeable with Hugging Face PEFT, in both directions.

The real ``peft`` package is the oracle (the product never imports it). Each case builds the same soft prompt
in both tools on a tiny random Llama (GQA: 4 query heads, 2 key/value heads), GPT-2 or T5, saved with
``save_pretrained`` into a local folder:

1. peftkit ``save_adapter`` -> ``peft.PeftModel.from_pretrained`` on a fresh copy of the base: same logits;
2. peft ``get_peft_model`` + ``save_pretrained`` -> peftkit ``load_adapter``: same logits.

PEFT's logits for prompt tuning and P-tuning cover the virtual tokens too; peftkit's are aligned with the
caller's tokens, so they are compared with PEFT's last T positions. Prefix tuning on T5 uses PEFT's encoder-decoder
layout (``num_transformer_submodules=2``: decoder layer l reads row slots 4l mod 2L, 4l mod 2L + 1), checked on the
2-layer tiny T5 (both layers share slots 0, 1) and on a 3-layer one (layers take slots 0, 4, 2: a permutation).
"""

from __future__ import annotations

import json
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
from peftkit.errors import AdapterFileError
from peftkit.methods._soft_prompt import Geometry
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from tests.tiny import build_t5, make_tiny, perturb_adapters

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
    Case("t5-p_tuning-lstm", "t5", lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
         lambda task: _ptune(task, encoder_reparameterization_type="LSTM")),
    Case("t5-prefix", "t5", lambda: PrefixTuningConfig(num_virtual_tokens=N), _prefix),
    Case("t5-prefix-projection", "t5",
         lambda: PrefixTuningConfig(num_virtual_tokens=N, projection=True, encoder_hidden_size=16),
         lambda task: _prefix(task, prefix_projection=True, encoder_hidden_size=16)),
]


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.id == name)


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


# -- prefix tuning on encoder-decoders (T5): PEFT's num_transformer_submodules=2 layout -------------------------


def test_t5_prefix_file_says_what_peft_writes(load_base, tmp_path: Path) -> None:
    model = peftkit.inject(load_base("t5"), PrefixTuningConfig(num_virtual_tokens=N))
    peftkit.save_adapter(model, tmp_path / "ours")
    peft.get_peft_model(load_base("t5"), _prefix("SEQ_2_SEQ_LM")).save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    fields = ("peft_type", "task_type", "num_transformer_submodules", "num_layers", "token_dim", "num_attention_heads")
    assert {k: ours[k] for k in fields} == {k: theirs[k] for k in fields}
    assert ours["num_transformer_submodules"] == 2
    shapes = [load_file(str(tmp_path / d / "adapter_model.safetensors"))["prompt_embeddings"].shape
              for d in ("ours", "theirs")]
    assert shapes[0] == shapes[1] == (N, 2 * 2 * 32)  # (N, layers * (k, v) * kv_dim): N rows, not 2N


@pytest.mark.parametrize("layers", [2, 3])
def test_t5_prefix_reads_peft_row_slots(layers: int, tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    build_t5(num_layers=layers).save_pretrained(base_dir)
    tiny = make_tiny("t5")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base_dir), _prefix("SEQ_2_SEQ_LM")).eval()
    expected = peft_logits(case_named("t5-prefix"), theirs, tiny.inputs)
    theirs.save_pretrained(tmp_path / "adapter")
    model = peftkit.load_adapter(AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval(), tmp_path / "adapter")
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)

    # the slots decoder layer l reads: PEFT's (4l mod 2L, +1), not the decoder-only (2l, 2l+1)
    geo = Geometry.of(model)
    assert [geo.prefix_slot(i) for i in range(layers)] == {2: [0, 0], 3: [0, 4, 2]}[layers]
    table = peftkit.adapter_state_dict(model)["prompt_embeddings"]  # (N, L*2*kv_dim)
    unused = [s for s in range(2 * layers) if s not in {geo.prefix_slot(i) + j for i in range(layers) for j in (0, 1)}]
    kv = geo.kv_dim
    changed = table.clone()
    for slot in unused:
        changed[:, slot * kv:(slot + 1) * kv] = 100.0
    with torch.no_grad():
        model.get_input_embeddings().prompt_encoder["default"].embedding.weight.copy_(changed)
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)  # unused slots change nothing
    assert len(unused) == {2: 2, 3: 0}[layers]


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix", "prefix-projection"])
def test_t5_greedy_generation_equals_peft_both_ways(variant: str, load_base, tmp_path: Path) -> None:
    case = case_named(f"t5-{variant}")
    ids = make_tiny("t5").inputs["input_ids"]

    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base("t5"), case.theirs("SEQ_2_SEQ_LM")).eval()
    perturb_adapters_of_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.load_adapter(load_base("t5"), tmp_path / "theirs")
    expected = t5_greedy(theirs, ids)
    assert_same_greedy(t5_greedy(ours, ids), expected)
    assert_same_greedy(t5_greedy(ours, ids, use_cache=False), expected)
    base = t5_greedy(load_base("t5"), ids)[1]
    finite = expected[1].isfinite()  # min_new_tokens sets the end token's score to -inf
    assert (base - expected[1])[finite].abs().max() > 1e-2  # the prompt matters

    model = peftkit.inject(load_base("t5"), case.ours())
    perturb_adapters(model, std=1.0)
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_base("t5"), tmp_path / "ours").eval()
    assert_same_greedy(t5_greedy(theirs, ids), t5_greedy(model, ids))


def t5_greedy(model: nn.Module, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoder tokens and their scores (the tiny T5 repeats one token, so the scores say more)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, dim=1)  # (B, 1+6), (B, 6, V)


def assert_same_greedy(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)


def perturb_adapters_of_peft(model: nn.Module, std: float = 1.0) -> None:
    """Random values for PEFT's trainable prompt parameters (zero or small at init), so generation differs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_t5_prefix_loss_with_labels_equals_peft(load_base, tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_base("t5"), _prefix("SEQ_2_SEQ_LM")).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = peftkit.load_adapter(load_base("t5"), tmp_path / "adapter")
    ids = make_tiny("t5").inputs["input_ids"]
    labels = make_tiny("t5").inputs["decoder_input_ids"]
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        got = ours(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind, submodules", [("t5", 1), ("llama", 2)])
def test_prefix_file_with_another_layout_is_refused(kind: str, submodules: int, load_base, tmp_path: Path) -> None:
    # T5 with 1: PEFT's plain cache lets cross-attention write into the self-attention cache; Llama with 2: an
    # encoder-decoder cache. Neither is a prefix peftkit can reproduce.
    model = peftkit.inject(load_base(kind), PrefixTuningConfig(num_virtual_tokens=N))
    peftkit.save_adapter(model, tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "num_transformer_submodules": submodules}))
    fresh = load_base(kind)
    with pytest.raises(AdapterFileError, match=f"num_transformer_submodules={submodules} does not fit"):
        peftkit.load_adapter(fresh, tmp_path / "adapter")
    assert not hasattr(fresh, "peftkit_state") and type(fresh.get_input_embeddings()) is nn.Embedding
    assert not fresh._forward_pre_hooks and not fresh._forward_hooks
