"""Fixtures shared by every test: tiny random models (see tests/tiny.py) and saved Hugging Face bases.

``tiny_llama``, ``tiny_gpt2``, ``tiny_bert``, ``tiny_t5`` and ``tiny_mlp`` are :class:`tests.tiny.Tiny`
handles: ``.build()`` gives a fresh copy (identical weights every time), ``.run(model)`` its output on
fixed inputs. ``tiny_any`` runs a test once per model family.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import KINDS, Tiny, make_tiny  # noqa: E402

# Tiny matrices: one thread is fastest, and spinning worker threads crawl when the cores are busy.
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama() -> Tiny:
    """LlamaForCausalLM, GQA (4 query heads, 2 key/value heads), untied lm_head."""
    return make_tiny("llama")


@pytest.fixture
def tiny_gpt2() -> Tiny:
    """GPT2LMHeadModel: Conv1D projections, lm_head tied to wte."""
    return make_tiny("gpt2")


@pytest.fixture
def tiny_bert() -> Tiny:
    """BertModel (encoder only); output = last hidden state and pooled output."""
    return make_tiny("bert")


@pytest.fixture
def tiny_t5() -> Tiny:
    """T5ForConditionalGeneration (encoder-decoder)."""
    return make_tiny("t5")


@pytest.fixture
def tiny_mlp() -> Tiny:
    """A plain nn.Sequential: fc1 (16->32), fc2 (32->32), out (32->8), tanh between."""
    return make_tiny("mlp")


@pytest.fixture(params=KINDS)
def tiny_any(request: pytest.FixtureRequest) -> Tiny:
    """Each tiny model family in turn."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def hf_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``hf_base_dir(kind)``: a folder holding the tiny model saved with ``save_pretrained``.

    Loading a base from it gives ``config._name_or_path`` = that local folder, so adapter configs name a
    local base and PEFT never looks for it on a hub.
    """
    saved: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in saved:
            path = tmp_path_factory.mktemp(f"base-{kind}")
            make_tiny(kind).build().save_pretrained(path)
            saved[kind] = path
        return saved[kind]

    return get


from tests.lm import tiny_lm, tiny_lm_dir, tokenizer  # noqa: E402, F401  (the real tokenizer + a tiny Llama)
