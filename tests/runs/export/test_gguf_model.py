"""The whole model as GGUF: tokenizer keys equal to those of the GGUF SmolLM2 ships in, a merged model that
transformers' own GGUF reader loads back to the same logits, the routes per method, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peftkit import BottleneckConfig, DoraConfig, IA3Config, LoraConfig, PromptTuningConfig
from peftkit.cli.main import main
from peftkit.core.inject import unload
from peftkit.errors import ConfigError
from peftkit.models.builtin import source_gguf
from peftkit.models.load import load_for_eval
from peftkit.runs.export.gguf import export_gguf
from peftkit.runs.export.gguf_model import hf_rows
from tests.runs.export.conftest import ALL_LINEAR, read_gguf

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def test_base_alone_carries_the_shipped_gguf_tokenizer(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """The tiny model has SmolLM2's tokenizer: every tokenizer key equals the one in SmolLM2's own GGUF file (its
    pre-tokenizer name copied from there when the tokenizer's folder is the built-in's)."""
    import gguf

    result = export_gguf(str(tiny_lm_dir), None, tmp_path / "out", dtype="f32", pre="smollm")
    assert (result.route, result.files) == ("base", ["model.gguf"])
    ours = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    shipped = gguf.GGUFReader(str(source_gguf("smollm2-135m")))
    for key in TOKENIZER_KEYS:
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    fields, tensors = read_gguf(tmp_path / "out" / "model.gguf")
    assert fields["general.type"] == "model" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and "output.weight" not in tensors  # tied head
    model, _ = load_for_eval(str(tiny_lm_dir))
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["token_embd.weight"][1], state["model.embed_tokens.weight"].numpy())
    k = torch.from_numpy(tensors["blk.1.attn_k.weight"][1])
    np.testing.assert_array_equal(hf_rows(k, 2).numpy(), state["model.layers.1.self_attn.k_proj.weight"].numpy())


def test_pre_tokenizer_of_the_builtin_is_found() -> None:
    from peftkit.runs.export.gguf import _builtin_pre

    assert _builtin_pre("smollm2-135m") == "smollm"
    assert _builtin_pre("/nonexistent/folder") is None


@pytest.mark.parametrize("config", [DoraConfig(r=4, target_modules=ALL_LINEAR), IA3Config()],
                         ids=["dora", "ia3"])
def test_methods_without_a_lora_file_are_merged_and_read_back_by_transformers(
        make_adapter, tiny_lm_dir: Path, tmp_path: Path, config) -> None:
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(config)
    result = export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out", dtype="f32")
    assert result.route == "merged" and "no llama.cpp LoRA-file form" in result.notes[0]
    adapted, _ = load_for_eval(str(tiny_lm_dir), str(adapter))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits  # the adapter computed unmerged
        got = back(input_ids=ids).logits
    assert not torch.allclose(want, load_for_eval(str(tiny_lm_dir))[0](input_ids=ids).logits, atol=1e-2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # f32 merge reorders sums: rounding only


def test_merged_tensors_equal_peftkits_merge(make_adapter, tiny_lm_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(LoraConfig(r=4, target_modules=ALL_LINEAR))
    export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out", dtype="f32", merge=True)
    _, tensors = read_gguf(tmp_path / "out" / "model.gguf")
    merged = unload(load_for_eval(str(tiny_lm_dir), str(adapter))[0], merge=True).state_dict()
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"][1])
    np.testing.assert_array_equal(hf_rows(q, 4).numpy(), merged["model.layers.0.self_attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"][1], merged["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("config, reason", [(PromptTuningConfig(num_virtual_tokens=4), "prompt_tuning"),
                                            (BottleneckConfig(), "bottleneck_adapter")])
def test_methods_that_do_not_merge_are_refused(make_adapter, tiny_lm_dir: Path, tmp_path: Path, config,
                                               reason: str) -> None:
    adapter = make_adapter(config)
    with pytest.raises(ConfigError, match=rf"{reason} cannot be exported as GGUF: .*"):
        export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_folder_is_kept_without_overwrite(tiny_lm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_gguf(str(tiny_lm_dir), None, out)
    assert (out / "mine.txt").read_text() == "keep"


def test_an_architecture_without_gguf_export_is_named(hf_base_dir, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="this one is 'gpt2'"):
        export_gguf(str(hf_base_dir("gpt2")), None, tmp_path / "out")


def test_cli_exports_and_reports(make_adapter, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    adapter = make_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--ollama"]) == 0
    out = capsys.readouterr().out
    assert "lora GGUF written to" in out and "adapter.gguf, base.gguf, Modelfile" in out
    assert "ollama create NAME -f" in out
    assert main(["export", "--out", str(tmp_path / "x")]) == 2
    assert "give --adapter (a fine-tune) or --model (a base)" in capsys.readouterr().err


def test_qwen2_layout_reads_back_in_transformers(tokenizer, tmp_path: Path) -> None:
    """Qwen2 keeps Hugging Face's q/k row order and has q/k/v biases: transformers' GGUF reader agrees."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.5)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    export_gguf(str(tmp_path / "qwen"), None, tmp_path / "out", dtype="f32")
    fields, tensors = read_gguf(tmp_path / "out" / "model.gguf")
    assert fields["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in tensors and "output.weight" in tensors
    ours = load_for_eval(str(tmp_path / "qwen"))[0]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_model_folder_given_as_adapter_is_named(tiny_lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a whole model folder .*pass it as --model"):
        export_gguf(str(tiny_lm_dir), str(tiny_lm_dir), tmp_path / "out")
