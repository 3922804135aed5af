"""Sequence-classification LoRA adapters are interchangeable with Hugging Face PEFT (task_type SEQ_CLS).

PEFT trains the head as ``modules_to_save`` (a wrapped copy of ``classifier``/``score``) and saves it under
``base_model.model.classifier.weight``; peftkit's ``task: seq_cls`` does the same through ``with_head``. On a
tiny BERT (``classifier``) and a tiny Llama (``score``), both directions give the same logits, and the head
really comes from the file: the fresh base that loads the adapter starts with a different random head.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import peftkit
from peftkit.runs.task_types import with_head
from tests.tiny import _ids

HEAD = {"bert": "classifier", "llama": "score"}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
ATOL = 1e-5


@pytest.fixture
def load_cls(hf_base_dir: Callable[[str], Path]) -> Callable[..., nn.Module]:
    def load(kind: str, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # the new head's random init
        return AutoModelForSequenceClassification.from_pretrained(hf_base_dir(kind), num_labels=3, pad_token_id=0).eval()

    return load


def inputs() -> dict[str, torch.Tensor]:
    ids = _ids((3, 7), seed=4)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0  # one right-padded row (the Llama score head reads its last real token)
    return {"input_ids": ids, "attention_mask": mask}


def head_of(model: nn.Module, kind: str) -> nn.Linear:
    return getattr(model, HEAD[kind])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peftkit_seq_cls_adapter_loads_in_peft(kind: str, load_cls, tmp_path: Path) -> None:
    model = load_cls(kind)
    config = with_head(model, peftkit.LoraConfig(r=4, alpha=8, init="random", target_modules=TARGETS[kind]))
    peftkit.inject(model, config)
    assert head_of(model, kind).weight.requires_grad
    with torch.no_grad():
        head_of(model, kind).weight.normal_(0, 0.5)  # a trained head
    expected = model(**inputs()).logits
    peftkit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == [HEAD[kind]]
    assert f"base_model.model.{HEAD[kind]}.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))

    fresh = load_cls(kind, seed=1)
    assert not torch.allclose(head_of(fresh, kind).weight, head_of(model, kind).weight)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(theirs(**inputs()).logits, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_seq_cls_adapter_loads_in_peftkit(kind: str, load_cls, tmp_path: Path) -> None:
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=TARGETS[kind])
    theirs = peft.get_peft_model(load_cls(kind), config).eval()
    wrapped = head_of(theirs.base_model.model, kind)  # PEFT's ModulesToSaveWrapper
    with torch.no_grad():
        wrapped.modules_to_save["default"].weight.normal_(0, 0.5)
    expected = theirs(**inputs()).logits
    theirs.save_pretrained(tmp_path)

    fresh = load_cls(kind, seed=1)
    peftkit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(**inputs()).logits, expected, atol=ATOL, rtol=ATOL)
    # and back out again in the same layout
    peftkit.save_adapter(fresh, tmp_path / "again")
    ours, theirs_file = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "again", tmp_path))
    assert ours.keys() == theirs_file.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs_file[key], atol=0, rtol=0)
