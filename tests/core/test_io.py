"""Adapter folders: what save_adapter writes, load_adapter round trips, every loading error, atomic saves."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peftkit
import peftkit.core.io as io
from tests.tiny import Tiny, adapter_layer_names, build_llama, make_tiny, perturb_adapters, weights

QV = ["q_proj", "v_proj"]


def saved_llama(tiny: Tiny, path: Path, **kw) -> tuple[nn.Module, torch.Tensor]:
    """Save a random q/v LoRA of the tiny Llama at ``path``; returns (model, its output)."""
    model = peftkit.inject(tiny.build(), peftkit.LoraConfig(r=4, alpha=8, target_modules=QV, **kw))
    perturb_adapters(model)
    peftkit.save_adapter(model, path)
    return model, tiny.run(model)


def assert_left_clean(model: nn.Module, tiny: Tiny, base_out: torch.Tensor) -> None:
    """A failed load left no adapter behind: no wrappers, no state, base weights and output unchanged."""
    assert adapter_layer_names(model) == []
    assert not hasattr(model, "peftkit_state")
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(tiny.run(model), base_out, rtol=0, atol=0)


# -- what is written -------------------------------------------------------------------------------------


def test_save_writes_a_peft_folder(tiny_llama: Tiny, tmp_path: Path) -> None:
    model, _ = saved_llama(tiny_llama, tmp_path / "ad", dropout=0.1)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "peftkit.json"]  # + which base (test_identity.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left behind
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "fan_in_fan_out": False,
        "bias": "none", "use_rslora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "use_dora": False, "lora_bias": False,
    }
    weights_file = tmp_path / "ad" / "adapter_model.safetensors"
    with safe_open(str(weights_file), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = load_file(str(weights_file))
    expected = peftkit.adapter_state_dict(model)
    assert sorted(tensors) == sorted(expected) and len(tensors) == 8
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)


def test_saved_config_names_a_local_base(tiny_llama: Tiny, hf_base_dir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_base_dir("llama"))
    peftkit.inject(model, peftkit.LoraConfig(target_modules=QV))
    peftkit.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(hf_base_dir("llama"))


@pytest.mark.parametrize(
    ("kind", "task_type", "targets", "fan_in_fan_out"),
    [
        ("gpt2", "CAUSAL_LM", ["c_attn"], True),  # Conv1D stores (in, out)
        ("bert", "FEATURE_EXTRACTION", ["query", "value"], False),
        ("t5", "SEQ_2_SEQ_LM", ["q", "v"], False),
        ("mlp", None, ["fc1", "fc2", "out"], False),
    ],
)
def test_saved_config_per_model_family(kind: str, task_type, targets, fan_in_fan_out: bool, tmp_path: Path) -> None:
    model = make_tiny(kind).build()
    peftkit.inject(model, peftkit.LoraConfig())  # default targets for the family
    peftkit.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["target_modules"], cfg["fan_in_fan_out"]) == (task_type, targets, fan_in_fan_out)


def test_saved_config_options(tiny_llama: Tiny, tmp_path: Path) -> None:
    config = peftkit.LoraConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True, init="gaussian",
                                rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.up_proj": 3})
    peftkit.save_adapter(peftkit.inject(tiny_llama.build(), config), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (cfg["use_rslora"], cfg["init_lora_weights"]) == (True, "gaussian")
    assert cfg["rank_pattern"] == {"q_proj": 2} and cfg["alpha_pattern"] == {r"layers\.1\.mlp\.up_proj": 3.0}
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (8, 32)


def test_exclude_and_layers_are_saved_as_the_exact_modules(tiny_llama: Tiny, tmp_path: Path) -> None:
    config = peftkit.LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], exclude=["o_proj"], layers=[1])
    peftkit.save_adapter(peftkit.inject(tiny_llama.build(), config), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert cfg["exclude_modules"] is None and cfg["layers_to_transform"] is None


def test_save_unknown_adapter_name(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(target_modules=QV))
    with pytest.raises(ValueError, match="no adapter named 'b'; loaded: default"):
        peftkit.save_adapter(model, tmp_path / "ad", adapter_name="b")
    assert not (tmp_path / "ad").exists()


# -- round trips -------------------------------------------------------------------------------------


def test_round_trip_gives_same_weights_and_output(tiny_llama: Tiny, tmp_path: Path) -> None:
    model, out = saved_llama(tiny_llama, tmp_path / "ad")
    loaded = peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")
    assert adapter_layer_names(loaded) == adapter_layer_names(model)
    sd, expected = peftkit.adapter_state_dict(loaded), peftkit.adapter_state_dict(model)
    assert sorted(sd) == sorted(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    torch.testing.assert_close(tiny_llama.run(loaded), out, rtol=0, atol=0)
    config = loaded.peftkit_state.configs["default"]
    assert (config.r, config.alpha, config.target_modules) == (4, 8.0, QV)


def test_load_for_inference_or_training(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    frozen = peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")
    assert peftkit.count_parameters(frozen).trainable == 0
    trainable = peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad", trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".lora_" in n
    }
    assert peftkit.count_parameters(trainable).trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)


def test_load_under_another_name_beside_an_adapter(tiny_llama: Tiny, tmp_path: Path) -> None:
    _, out = saved_llama(tiny_llama, tmp_path / "ad")
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(target_modules=["o_proj"], init="random"))
    peftkit.load_adapter(model, tmp_path / "ad", adapter_name="loaded")
    assert list(model.peftkit_state.configs) == ["default", "loaded"]
    peftkit.set_active(model, "loaded")
    torch.testing.assert_close(tiny_llama.run(model), out, rtol=0, atol=0)


def test_trained_biases_round_trip(tiny_mlp: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_mlp.build(), peftkit.LoraConfig(r=2, target_modules=["fc1"], bias="all"))
    perturb_adapters(model)  # LoRA weights and every bias
    out = tiny_mlp.run(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    assert sorted(load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))) == [
        "base_model.model.fc1.base_layer.bias", "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
        "base_model.model.fc2.bias", "base_model.model.out.bias",
    ]
    loaded = peftkit.load_adapter(tiny_mlp.build(), tmp_path / "ad")
    torch.testing.assert_close(tiny_mlp.run(loaded), out, rtol=0, atol=0)


def test_nothing_is_unpickled(tiny_llama: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = saved_llama(tiny_llama, tmp_path / "ad")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for target, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)
    loaded = peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")
    torch.testing.assert_close(tiny_llama.run(loaded), out, rtol=0, atol=0)


# -- loading errors --------------------------------------------------------------------------------------


def test_missing_folder(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match="adapter folder not found: .*nowhere"):
        peftkit.load_adapter(model, tmp_path / "nowhere")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_missing_config(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(peftkit.AdapterFileError, match=r"adapter_config.json: missing \(not an adapter folder\?\)"):
        peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "adapter_config.json: not valid JSON"),
        (b"\xff\xfe\x00garbage", "adapter_config.json: not valid JSON"),
        ("[1, 2]", "adapter_config.json: no 'peft_type' field"),
        ('{"r": 8}', "adapter_config.json: no 'peft_type' field"),
        ('{"peft_type": "MULTITASK_PROMPT_TUNING"}',
         "adapter_config.json: adapter type 'MULTITASK_PROMPT_TUNING' is not supported"),
        ('{"peft_type": "VERA", "target_modules": ["q_proj"]}', "adapter type 'VERA' is not supported"),
        ('{"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}',
         "adapter_config.json: method.r must be a positive integer"),
        ('{"peft_type": "LORA", "r": "eight", "target_modules": ["q_proj"]}', "adapter_config.json: .*eight"),
        ('{"peft_type": "LORA", "lora_bias": true, "target_modules": ["q_proj"]}', "adapter_config.json: .*'lora_bias'"),
    ],
)
def test_bad_config(tiny_llama: Tiny, tmp_path: Path, text: str | bytes, message: str) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    file = tmp_path / "ad" / "adapter_config.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=message):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_missing_weights_file_even_with_a_pickle_beside_it(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "ad" / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=r"adapter_model.safetensors: missing \(only safetensors"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert not marker.exists()
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_unreadable_weights_file(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match="adapter_model.safetensors: unreadable safetensors file"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_shape_mismatch_names_the_first_tensor(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")  # hidden size 32
    model = build_llama(hidden_size=48)
    base_out = tiny_llama.run(model)
    with pytest.raises(peftkit.AdapterFileError) as err:
        peftkit.load_adapter(model, tmp_path / "ad")
    assert "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (4, 32) " \
           "but the model expects (4, 48)" in str(err.value)
    assert_left_clean(model, tiny_llama, base_out)


def rewrite_weights(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_unexpected_tensor(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    rewrite_weights(tmp_path / "ad", lambda t: t.update({key: torch.zeros(4, 32)}))
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=f"tensor '{key}' does not belong to this model's adapter "
                                                      r"\(1 unexpected tensors\)"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_missing_tensor(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_weights(tmp_path / "ad", lambda t: t.pop(key))
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=f"tensor '{key}' is missing"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_whole_embedding_weights_in_peft_files_are_loaded(tiny_llama: Tiny, tmp_path: Path) -> None:
    # PEFT saves the full weight of an adapted embedding too (save_embedding_layers) and loads it into the base
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    peftkit.save_adapter(model, tmp_path / "ad")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    new_embedding = torch.randn(100, 32, generator=torch.Generator().manual_seed(4))
    rewrite_weights(tmp_path / "ad", lambda t: t.update({key: new_embedding}))
    loaded = peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")
    assert torch.equal(loaded.model.embed_tokens.base_layer.weight, new_embedding)
    # of the wrong shape, it is an error like any other tensor
    rewrite_weights(tmp_path / "ad", lambda t: t.update({key: torch.zeros(120, 32)}))
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=f"tensor '{key}' has shape \\(120, 32\\) but the model "
                                                      r"expects \(100, 32\)"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))
    # only embeddings that carry the adapter: other base weights in the file are unexpected
    rewrite_weights(tmp_path / "ad", lambda t: t.update({key: new_embedding,
                                                         "base_model.model.lm_head.weight": torch.zeros(100, 32)}))
    with pytest.raises(peftkit.AdapterFileError, match="tensor 'base_model.model.lm_head.weight' does not belong"):
        peftkit.load_adapter(tiny_llama.build(), tmp_path / "ad")


def test_adapter_of_another_architecture(tiny_gpt2: Tiny, tiny_llama: Tiny, tmp_path: Path) -> None:
    peftkit.save_adapter(peftkit.inject(tiny_gpt2.build(), peftkit.LoraConfig(target_modules=["c_attn"])), tmp_path / "ad")
    model = tiny_llama.build()
    with pytest.raises(peftkit.AdapterFileError, match=r"does not fit this model: .*\['c_attn'\] matched no module; "
                                                      r"available module names: .*q_proj"):
        peftkit.load_adapter(model, tmp_path / "ad")
    assert_left_clean(model, tiny_llama, tiny_llama.run(tiny_llama.build()))


def test_failed_load_keeps_the_existing_adapter(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    rewrite_weights(tmp_path / "ad", lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"))
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(target_modules=["q_proj", "o_proj"], init="random"))
    before = weights(model)
    out = tiny_llama.run(model)
    with pytest.raises(peftkit.AdapterFileError, match="is missing"):
        peftkit.load_adapter(model, tmp_path / "ad", adapter_name="b")
    assert list(model.peftkit_state.configs) == ["default"]
    assert weights(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear  # b's only module is unwrapped again
    torch.testing.assert_close(tiny_llama.run(model), out, rtol=0, atol=0)


# -- atomic saving -------------------------------------------------------------------------------------


def test_failed_save_leaves_the_existing_folder_untouched(tiny_llama: Tiny, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(r=2, target_modules="all-linear", init="random"))

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        peftkit.save_adapter(model, tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # the temporary folder is gone
    with pytest.raises(OSError, match="disk full"):
        peftkit.save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_replaces_an_existing_folder(tiny_llama: Tiny, tmp_path: Path) -> None:
    saved_llama(tiny_llama, tmp_path / "ad")
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(r=2, target_modules=["o_proj"], init="random"))
    peftkit.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["target_modules"]) == (2, ["o_proj"])
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert all(".o_proj." in k for k in tensors) and len(tensors) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # the old folder is not left aside
