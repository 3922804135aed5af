"""Adapter identity: a saved adapter records its base (name + weight fingerprint); loading it onto another base
warns, or refuses with ``strict_base``. The fingerprint ignores adapters (attached, merged, saved, loaded)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import peftkit
from peftkit.cli.main import main
from peftkit.core.identity import ALGORITHM, SIDECAR_NAME, BaseMismatchWarning, base_fingerprint, model_fingerprint
from peftkit.errors import AdapterFileError
from tests.methods.test_invariants import SPECS
from tests.tiny import build_llama, llama_config, make_tiny, perturb_adapters


def other_llama() -> LlamaForCausalLM:
    """Same architecture as ``build_llama``, other random weights: another base."""
    torch.manual_seed(1)
    return LlamaForCausalLM(llama_config()).eval()


def lora_adapter(model: nn.Module, path: Path) -> nn.Module:
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"))
    peftkit.save_adapter(model, path)
    return model


@pytest.mark.parametrize(("method", "kind"), [pytest.param(m, k, id=f"{k}-{m}") for m in sorted(SPECS)
                                               for k in ("llama", "gpt2") if k in SPECS[m].kinds])
def test_fingerprint_ignores_attached_adapters(method: str, kind: str) -> None:
    spec = SPECS[method]
    tiny = make_tiny(kind)
    model = tiny.build()
    base = base_fingerprint(model)
    peftkit.inject(model, spec.config(kind))
    perturb_adapters(model)
    assert model_fingerprint(model) == base  # recorded at inject
    if spec.in_place or spec.quantizes_base:  # the base tensors were trained or quantized: the record keeps naming
        # the base they came from
        assert base_fingerprint(model) != base
        return
    assert base_fingerprint(model) == base  # adapter parameters skipped, ``.base_layer`` names unwrapped
    peftkit.unload(model)
    assert base_fingerprint(model) == base


def test_fingerprint_tells_bases_apart_not_dtypes() -> None:
    base = base_fingerprint(build_llama())
    assert base == base_fingerprint(build_llama())
    assert base_fingerprint(other_llama()) != base
    assert base_fingerprint(build_llama().to(torch.bfloat16)) == base  # the same checkpoint loaded in bf16
    changed = build_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # one tensor of the base fine-tuned
    assert base_fingerprint(changed) != base
    assert len(base) == 64 and set(base) <= set("0123456789abcdef")  # a SHA-256 hex digest


def test_fingerprint_is_fast() -> None:
    model = make_tiny("gpt2").build()
    start = time.perf_counter()
    for _ in range(10):
        base_fingerprint(model)
    assert (time.perf_counter() - start) / 10 < 0.02  # a tiny model; SmolLM2-135M: ~10 ms (~0.1 s cold)


def test_saved_adapter_records_its_base_and_loads_silently_onto_it(tmp_path: Path) -> None:
    lora_adapter(build_llama(), tmp_path / "ad")
    record = json.loads((tmp_path / "ad" / SIDECAR_NAME).read_text())
    assert record == {"base_model_name_or_path": None, "base_fingerprint": base_fingerprint(build_llama()),
                      "fingerprint_algorithm": ALGORITHM, "fingerprint_excludes": []}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        model = peftkit.load_adapter(build_llama(), tmp_path / "ad", strict_base=True)
        peftkit.save_adapter(model, tmp_path / "again")  # and save -> load -> save keeps the record
    assert json.loads((tmp_path / "again" / SIDECAR_NAME).read_text()) == record


def test_other_base_warns_in_one_line_and_strict_refuses(tmp_path: Path) -> None:
    lora_adapter(build_llama(), tmp_path / "ad")
    theirs, ours = base_fingerprint(build_llama()), base_fingerprint(other_llama())
    with pytest.warns(BaseMismatchWarning) as caught:
        model = peftkit.load_adapter(other_llama(), tmp_path / "ad")
    (message,) = [str(w.message) for w in caught]
    assert "\n" not in message
    assert f"trained on base None (fingerprint {theirs[:12]}) but is loaded onto None (fingerprint {ours[:12]})" \
        in message
    assert model.peftkit_state.configs  # loaded anyway

    fresh = other_llama()
    with pytest.raises(AdapterFileError, match=f"fingerprint {theirs[:12]}.*fingerprint {ours[:12]}"):
        peftkit.load_adapter(fresh, tmp_path / "ad", strict_base=True)
    assert not hasattr(fresh, "peftkit_state")  # refused before anything was attached
    with pytest.raises(AdapterFileError):  # a model with adapters already keeps them
        peftkit.load_adapter(model, tmp_path / "ad", adapter_name="second", strict_base=True)
    assert list(model.peftkit_state.configs) == ["default"]


def test_the_record_names_the_base_under_merged_adapters(tmp_path: Path) -> None:
    merged = lora_adapter(build_llama(), tmp_path / "lora")
    peftkit.merge(merged)
    peftkit.save_adapter(merged, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / SIDECAR_NAME).read_text())["base_fingerprint"] == \
        base_fingerprint(build_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        peftkit.load_adapter(build_llama(), tmp_path / "merged", strict_base=True)


@pytest.mark.parametrize("config", [peftkit.SelectiveConfig(kinds=["norm"]),
                                    peftkit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["selective", "new-head"])
def test_parameters_trained_in_place_are_the_adapters_not_the_bases(config, tmp_path: Path) -> None:
    trained = peftkit.inject(build_llama(), config)
    perturb_adapters(trained)  # training changed the selected base parameters in place
    peftkit.save_adapter(trained, tmp_path / "ad")
    record = json.loads((tmp_path / "ad" / SIDECAR_NAME).read_text())
    excludes = record["fingerprint_excludes"]
    assert excludes and all(("norm" in n) if config.method_name == "selective" else n == "lm_head.weight"
                            for n in excludes)
    assert record["base_fingerprint"] == model_fingerprint(build_llama(), excludes) != base_fingerprint(build_llama())
    other_values = build_llama()  # e.g. a classification head initialised afresh: the file brings its weights
    with torch.no_grad():
        for name, p in other_values.named_parameters():
            if name in excludes:
                p.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        peftkit.load_adapter(other_values, tmp_path / "ad", strict_base=True)
    with pytest.raises(AdapterFileError, match="trained on base"):
        peftkit.load_adapter(other_llama(), tmp_path / "ad", strict_base=True)


def test_adapters_without_a_record_load_unchecked(tmp_path: Path) -> None:
    lora_adapter(build_llama(), tmp_path / "ad")
    (tmp_path / "ad" / SIDECAR_NAME).unlink()  # e.g. an adapter written by PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        peftkit.load_adapter(other_llama(), tmp_path / "ad", strict_base=True)
    lora_adapter(build_llama(), tmp_path / "future")
    record = json.loads((tmp_path / "future" / SIDECAR_NAME).read_text())
    (tmp_path / "future" / SIDECAR_NAME).write_text(json.dumps({**record, "fingerprint_algorithm": "v99"}))
    peftkit.load_adapter(other_llama(), tmp_path / "future", strict_base=True)  # not comparable: not checked
    (tmp_path / "future" / SIDECAR_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="peftkit.json: not valid JSON"):
        peftkit.load_adapter(build_llama(), tmp_path / "future")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loads_our_folder_without_complaint(kind: str, hf_base_dir: Callable[[str], Path],
                                                 tmp_path: Path) -> None:
    load = lambda: AutoModelForCausalLM.from_pretrained(hf_base_dir(kind)).eval()  # noqa: E731
    model = peftkit.inject(load(), peftkit.LoraConfig(r=4, init="random"))
    peftkit.save_adapter(model, tmp_path / "ad")
    record = json.loads((tmp_path / "ad" / SIDECAR_NAME).read_text())
    assert record["base_model_name_or_path"] == str(hf_base_dir(kind))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "ad").eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]  # adapter_config.json holds only PEFT keys
    x = make_tiny(kind).inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_cli_strict_base(tiny_lm: tuple[nn.Module, object], tokenizer, tmp_path: Path, capsys) -> None:
    model, _ = tiny_lm
    lora_adapter(model, tmp_path / "ad")
    other = tmp_path / "other-base"
    torch.manual_seed(1)
    LlamaForCausalLM(model.config).save_pretrained(other)  # same architecture and tokenizer, other weights
    tokenizer.save_pretrained(other)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    generate = ["generate", "--model", str(other), "--adapter", str(tmp_path / "ad"), "--prompt", "Hi",
                "--max-new-tokens", "2"]
    evaluate = ["eval", "--model", str(other), "--adapter", str(tmp_path / "ad"), "--data", str(tmp_path / "text.txt")]
    merge = ["merge", "--model", str(other), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]
    combine = ["merge", "--model", str(other), "--adapter", str(tmp_path / "ad"), "--adapter", str(tmp_path / "ad"),
               "--out", str(tmp_path / "combined"), "--overwrite"]
    capsys.readouterr()
    for argv in (generate, evaluate, merge, combine):
        assert main([*argv, "--strict-base"]) == 2
        assert "--out" not in argv or not Path(argv[argv.index("--out") + 1]).exists()  # nothing written
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "peftkit:" in line]
        assert len(err) == 1 and "peftkit: error:" in err[0] and "the adapter was trained on base" in err[0]
        with pytest.warns(BaseMismatchWarning, match=f"loaded onto '{other}'"):
            assert main(argv) == 0
        capsys.readouterr()
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "combined" / "adapter_config.json").is_file()


def test_qlora_records_the_unquantized_base() -> None:
    from peftkit.methods.qlora import QLoraConfig

    model = peftkit.inject(build_llama(), QLoraConfig(r=4, target_modules=["q_proj"]))
    assert model_fingerprint(model) == base_fingerprint(build_llama())
    assert base_fingerprint(model) != model_fingerprint(model)  # the quantized weights themselves differ


@pytest.mark.slow
def test_fingerprint_of_smollm2_135m_takes_under_0_2_s() -> None:
    from peftkit.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))
    base_fingerprint(model)  # first touch of the memory-mapped weights (~0.1 s measured)
    start = time.perf_counter()
    fp = base_fingerprint(model)
    assert time.perf_counter() - start < 0.2
    assert base_fingerprint(model.to(torch.bfloat16)) == fp
