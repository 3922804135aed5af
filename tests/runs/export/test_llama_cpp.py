"""Exported GGUF files in llama.cpp itself (llama-cpp-python, an optional extra: PyPI ships it as source and
installing it compiles llama.cpp, ~20 min on 2 cores; ``PEFTKIT_LLAMA_CPP=1 bash scripts/setup.sh`` adds it).

SmolLM2 with a LoRA adapter (random B, q/k/v/down): the LoRA GGUF over an f32 base GGUF, and the merged GGUF, give
llama.cpp logits close to peftkit's on the same tokens, and the same greedy next tokens. The bound: llama.cpp's f32
CPU kernels sum in another order than PyTorch (REFERENCE.md measured 0.018 for the base, 0.030 with an adapter);
0.1 leaves room for other CPUs, while a wrong row order or scale moves logits by > 1 (measured 1.13).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: "
                                "PEFTKIT_LLAMA_CPP=1 bash scripts/setup.sh compiles it, ~20 min)")

from peftkit import LoraConfig, inject, save_adapter  # noqa: E402
from peftkit.models import load_model  # noqa: E402
from peftkit.models.load import load_for_eval  # noqa: E402
from peftkit.runs.export.gguf import export_gguf  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _llama_logits(model_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(model_path), logits_all=True, n_ctx=256, n_threads=2, verbose=False, **kw)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m")
    inject(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("smollm2-lora") / "adapter"
    save_adapter(model, out)
    return out


def test_lora_file_and_merged_model_match_peftkit(adapter: Path, tmp_path: Path) -> None:
    model, tok = load_for_eval("smollm2-135m", str(adapter))
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    export_gguf("smollm2-135m", str(adapter), tmp_path / "lora", dtype="f32", ollama=True)
    export_gguf("smollm2-135m", str(adapter), tmp_path / "merged", dtype="f32", merge=True)
    for got in (_llama_logits(tmp_path / "lora" / "base.gguf", ids, tmp_path / "lora" / "adapter.gguf"),
                _llama_logits(tmp_path / "merged" / "model.gguf", ids)):
        assert np.abs(got - ours).max() < 0.1
        assert (got.argmax(-1) == ours.argmax(-1)).all()
