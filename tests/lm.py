"""Fixtures for pipeline tests: the real SmolLM2 tokenizer with a tiny random Llama behind it.

The tokenizer comes from the built-in model's cached conversion (made once, ~30 s on a fresh machine);
the model is 2 layers x 32 wide (initializer_range 0.5 so that logits can move far from uniform: with
the usual 0.02 a tiny tied-embedding model barely learns).
Import these into a folder's conftest.py to use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tokenizer():
    from peftkit.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_lm_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-lm")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm(tiny_lm_dir: Path):
    """A fresh (model, tokenizer) pair loaded from ``tiny_lm_dir``."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(tiny_lm_dir, local_files_only=True)
