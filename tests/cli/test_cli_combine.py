"""``peftkit merge`` with several adapters: the combined adapter, the combination merged into the base, and errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli.main import main
from tests.tiny import perturb_adapters

IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def adapters(tiny_lm_dir, tmp_path):
    """Two LoRA adapters (r 2 and r 3, rsLoRA) on the tiny LM, saved; returns their folders and weight deltas."""
    paths, deltas = [], []
    for name, seed, r, extra in (("sentiment", 1, 2, {}), ("chat", 2, 3, {"use_rslora": True})):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        peftkit.inject(model, peftkit.LoraConfig(r=r, alpha=4, target_modules=TARGETS, **extra))
        perturb_adapters(model, seed=seed)
        peftkit.save_adapter(model, tmp_path / name)
        paths.append(str(tmp_path / name))
        deltas.append({n: layer.delta_weight("default").detach().clone()
                       for n, layer in model.named_modules() if hasattr(layer, "delta_weight")})
    return paths, deltas


def base_plus(tiny_lm_dir, deltas, weights):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        for w, d in zip(weights, deltas):
            for name, delta in d.items():
                model.get_submodule(name).weight.add_(w * delta)
    return model


def test_combined_adapter_is_the_weighted_sum(adapters, tiny_lm_dir, tmp_path, capsys) -> None:
    paths, deltas = adapters
    out = tmp_path / "combined"
    argv = ["merge", "--model", str(tiny_lm_dir), "--adapter", paths[0], "--adapter", paths[1],
            "--weights", "0.5,-0.25", "--combination", "linear", "--out", str(out)]
    assert main(argv) == 0
    assert "combined adapter written to" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 5, 5, False)
    model = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out)
    expected = logits(base_plus(tiny_lm_dir, deltas, [0.5, -0.25]))
    assert (expected - logits(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))).abs().max() > 1e-2
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-4)

    # never overwritten without --overwrite; with it, replaced
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main([*argv[:-6], "--combination", "svd", "--rank", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_into_base_writes_a_standalone_model_equal_to_stacking(adapters, tiny_lm_dir, tmp_path, capsys) -> None:
    paths, _ = adapters
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_lm_dir), "--adapter", paths[0], "--adapter", paths[1],
                 "--into-base", "--out", str(out)]) == 0  # default: cat with weights 1, the exact sum
    assert "merged model written to" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    assert not any("lora" in n for n, _ in plain.named_parameters())
    stacked = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peftkit.load_adapter(stacked, paths[0], "a")
    peftkit.load_adapter(stacked, paths[1], "b")
    peftkit.set_active(stacked, ["a", "b"])
    torch.testing.assert_close(logits(plain), logits(stacked), rtol=0, atol=1e-4)


def test_one_adapter_with_a_combination_option_is_rescaled_or_compressed(adapters, tiny_lm_dir, tmp_path) -> None:
    paths, deltas = adapters
    out = tmp_path / "half"
    assert main(["merge", "--model", str(tiny_lm_dir), "--adapter", paths[1], "--weights", "0.5", "--out", str(out)]) == 0
    model = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out)
    torch.testing.assert_close(logits(model), logits(base_plus(tiny_lm_dir, deltas[1:], [0.5])), rtol=0, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1"], "1 weights for 2 adapters; give one weight per adapter"),
    (["--weights", "1,x"], "--weights must be comma-separated numbers, got '1,x'"),
    (["--combination", "ties"], "combination 'ties' needs a density"),
    (["--combination", "dare", "--density", "0"], r"density must be in \(0, 1\], got 0.0"),
    (["--combination", "svd", "--rank", "0"], "rank must be an integer >= 1, got 0"),
    (["--rank", "4"], "'cat' is exact"),
])
def test_bad_options_one_line_exit_2_nothing_written(adapters, tiny_lm_dir, tmp_path, capsys, extra, message) -> None:
    paths, _ = adapters
    out = tmp_path / "out"
    code = main(["merge", "--model", str(tiny_lm_dir), "--adapter", paths[0], "--adapter", paths[1],
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_adapters_of_different_bases_are_refused(adapters, tiny_lm_dir, tmp_path, capsys) -> None:
    paths, _ = adapters
    file = tmp_path / "chat" / "peftkit.json"  # as if trained on another base: another fingerprint
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_fingerprint": "0" * 64}))
    code = main(["merge", "--model", str(tiny_lm_dir), "--adapter", paths[0], "--adapter", paths[1],
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "chat: made for another base model than" in err and "cannot be combined" in err
    assert not (tmp_path / "out").exists()
