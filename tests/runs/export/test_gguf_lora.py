"""The llama.cpp LoRA GGUF: its keys, names, shapes and types, and the weights it rebuilds, W + (alpha/r)·B·A,
against peftkit's own merge (q, k, v, o and MLP targets; rsLoRA and rank_pattern, whose scales are folded into B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peftkit import LoraConfig
from peftkit.core.inject import unload
from peftkit.errors import ConfigError
from peftkit.models.load import load_for_eval
from peftkit.runs.export.gguf import export_gguf
from peftkit.runs.export.gguf_model import Layout, hf_rows, rope_rows
from tests.runs.export.conftest import ALL_LINEAR, read_gguf

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _merged_weights(base: str, adapter: Path) -> dict[str, torch.Tensor]:
    model, _ = load_for_eval(base, str(adapter))
    return {k: v.clone() for k, v in unload(model, merge=True).state_dict().items()}


def _base_weights(base: str) -> dict[str, torch.Tensor]:
    model, _ = load_for_eval(base)
    return model.state_dict()


def test_rope_rows_is_llama_cpps_permute_and_hf_rows_undoes_it() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    # llama.cpp's convert_hf_to_gguf permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    expected = w.numpy().reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(32, 3)
    assert np.array_equal(rope_rows(w, 4).numpy(), expected)
    assert torch.equal(hf_rows(rope_rows(w, 4), 4), w)
    assert not torch.equal(rope_rows(w, 4), w)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_file_rebuilds_the_merged_weights(make_adapter, tiny_lm_dir: Path, tmp_path: Path, rslora: bool) -> None:
    config = LoraConfig(r=4, alpha=8, target_modules=ALL_LINEAR, use_rslora=rslora, rank_pattern={"v_proj": 2},
                        alpha_pattern={"down_proj": 3.0})
    adapter = make_adapter(config)
    result = export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out", dtype="f32")
    assert (result.route, result.files) == ("lora", ["adapter.gguf"])
    fields, tensors = read_gguf(tmp_path / "out" / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    # the most common s·r is the file's alpha: plain LoRA 8/4·4 = 8; rsLoRA 8/2·4 = 16
    assert alpha == pytest.approx(16.0 if rslora else 8.0)
    names = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(2) for g in GGUF_NAMES.values() for ab in "ab"}
    assert set(tensors) == names
    base, merged = _base_weights(str(tiny_lm_dir)), _merged_weights(str(tiny_lm_dir), adapter)
    layout = Layout.of(load_for_eval(str(tiny_lm_dir))[0].config)
    for i in range(2):
        for hf, g in GGUF_NAMES.items():
            kind, a = tensors[f"blk.{i}.{g}.weight.lora_a"]
            _, b = tensors[f"blk.{i}.{g}.weight.lora_b"]
            r = 2 if hf == "v_proj" else 4
            prefix = f"model.layers.{i}.{'self_attn' if g.startswith('attn') else 'mlp'}.{hf}.weight"
            w = base[prefix]
            assert kind == "F32" and a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
            b = torch.from_numpy(b)
            if hf in ("q_proj", "k_proj"):  # undo llama.cpp's RoPE row order
                b = hf_rows(b, layout.heads if hf == "q_proj" else layout.kv_heads)
            rebuilt = w + (alpha / r) * (b @ torch.from_numpy(a))  # llama.cpp's scale: alpha / rank of B
            torch.testing.assert_close(rebuilt, merged[prefix], rtol=1e-5, atol=1e-5)


def test_without_the_reordering_q_would_be_wrong(make_adapter, tiny_lm_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(LoraConfig(r=4, alpha=4, target_modules=["q_proj"]))
    export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out", dtype="f32")
    _, tensors = read_gguf(tmp_path / "out" / "adapter.gguf")
    merged = _merged_weights(str(tiny_lm_dir), adapter)["model.layers.0.self_attn.q_proj.weight"]
    base = _base_weights(str(tiny_lm_dir))["model.layers.0.self_attn.q_proj.weight"]
    b, a = (torch.from_numpy(tensors[f"blk.0.attn_q.weight.lora_{x}"][1]) for x in "ba")
    assert not torch.allclose(base + b @ a, merged, atol=1e-3)  # the file's B is in llama.cpp's order
    torch.testing.assert_close(rope_rows(base, 4) + b @ a, rope_rows(merged, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_dtypes(make_adapter, tiny_lm_dir: Path, tmp_path: Path, dtype: str) -> None:
    adapter = make_adapter(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "f32", dtype="f32")
    export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / dtype, dtype=dtype)
    _, exact = read_gguf(tmp_path / "f32" / "adapter.gguf")
    _, typed = read_gguf(tmp_path / dtype / "adapter.gguf")
    for name, (_, want) in exact.items():
        kind, got = typed[name]
        # q8_0 needs whole 32-value rows: A (r x in=32 or 64) has them; B (out x r=4) does not and is f16
        expected_kind = {"f16": "F16", "bf16": "BF16"}.get(dtype) or ("Q8_0" if want.shape[-1] % 32 == 0 else "F16")
        assert kind == expected_kind, name
        # rounding bound of the type: relative 2^-11 (f16), 2^-8 (bf16); q8_0: half a step d = block max / 127, plus
        # the step's own f16 rounding (2^-11 relative) times |q| <= 127
        step = np.repeat(np.abs(want).reshape(-1, 32).max(1) / 127, 32).reshape(want.shape)
        bound = {"F16": 2**-11 * np.abs(want) + 1e-7, "BF16": 2**-8 * np.abs(want) + 1e-30,
                 "Q8_0": step * (0.5 + 127 * 2**-11) + 1e-7}
        assert np.all(np.abs(got - want) <= bound[kind]), name


def test_lora_on_the_embedding_or_with_modules_to_save_asks_for_merge(make_adapter, tiny_lm_dir: Path,
                                                                      tmp_path: Path) -> None:
    adapter = make_adapter(LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ConfigError, match=r"embed_tokens.*--merge"):
        export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out")
    adapter = make_adapter(LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match=r"modules_to_save.*--merge"):
        export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    # --merge writes them merged
    result = export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out", merge=True, dtype="f32")
    assert (result.route, result.files) == ("merged", ["model.gguf"])
