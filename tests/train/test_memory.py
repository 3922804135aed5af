"""``peftkit memory``: exact parameter/gradient/optimizer bytes, and the total against measured peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.core.inject import inject
from peftkit.train.config import load_config
from peftkit.train.memory import MB, measure_runtime_mb, predict_memory

METHODS = [
    ["method.name=lora"],
    ["method.name=lora", "method.target_modules=all-linear", "method.layers=[1]"],
    ["method.name=dora"],
    ["method.name=ia3"],
    ["method.name=bottleneck_adapter"],
    ["method.name=prefix_tuning"],
    ["method.name=p_tuning"],
    ["method.name=prompt_tuning"],  # its init reads weights: built on the CPU instead of meta
    ["method.name=bitfit"],  # GPT-2 only (Llama has no biases)
    ["method.name=selective", "method.kinds=[norm]"],
    ["method.name=linear_probe"],
    ["method.name=full"],
]


def _real_sums(model: torch.nn.Module) -> tuple[int, int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in params if p.requires_grad]
    return weights, sum(p.numel() * 4 for p in trainable), sum(2 * p.numel() * 4 for p in trainable)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("overrides", METHODS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_parameter_bytes_are_exact(hf_base_dir, kind, overrides):
    from transformers import AutoModelForCausalLM

    if kind == "gpt2" and "method.layers=[1]" in overrides:
        overrides = overrides[:2]
    if kind == "llama" and overrides == ["method.name=bitfit"]:
        pytest.skip("bitfit: Llama layers have no biases")
    cfg = load_config(None, [f"model={hf_base_dir(kind)}", *overrides])
    pred = predict_memory(cfg)  # built on the meta device
    model = AutoModelForCausalLM.from_pretrained(hf_base_dir(kind))
    inject(model, cfg.method_config())
    weights, grads, optim = _real_sums(model)
    assert round(pred.weights * MB) == weights
    assert round(pred.gradients * MB) == grads
    assert round(pred.optimizer * MB) == optim
    assert pred.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_layers_below_first_trainable_keep_nothing(hf_base_dir):
    base = [f"model={hf_base_dir('llama')}", "train.batch_size=4", "data.max_length=64"]
    top = predict_memory(load_config(None, [*base, "method.name=lora", "method.layers=[1]"]))
    every = predict_memory(load_config(None, [*base, "method.name=lora"]))
    soft = predict_memory(load_config(None, [*base, "method.name=prefix_tuning"]))
    probe = predict_memory(load_config(None, [*base, "method.name=linear_probe"]))
    assert (top.layers_with_backward, every.layers_with_backward, soft.layers_with_backward, probe.layers_with_backward) == (1, 2, 2, 0)
    assert top.activations < every.activations
    ckpt = predict_memory(load_config(None, [*base, "method.name=lora", "train.gradient_checkpointing=true"]))
    assert ckpt.activations < every.activations
    bf16 = predict_memory(load_config(None, [*base, "method.name=lora", "train.precision=bf16"]))
    assert bf16.activations < every.activations


def test_cli_prints_breakdown(hf_base_dir, capsys):
    from peftkit.cli.main import main

    assert main(["memory", f"model={hf_base_dir('llama')}", "method.name=lora"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "total"):
        assert word in out


def test_runtime_overhead_constant_is_measured():
    """The fixed runtime cost in the prediction is close to a fresh process importing the stack."""
    from peftkit.train.memory import RUNTIME_MB

    measured = measure_runtime_mb()
    assert 0.75 * measured < RUNTIME_MB < 1.4 * measured


def _train_peak(tmp_path: Path, overrides: list[str]) -> tuple[float, float]:
    """(predicted MB from the run summary, peak RSS MB of the child) of a real ``peftkit train``."""
    code = ("import runpy, sys; sys.argv = ['peftkit'] + sys.argv[1:]\n"
            "from peftkit.train.tracking import peak_memory_mb\n"
            "try:\n    runpy.run_module('peftkit', run_name='__main__')\n"
            "finally:\n    print('MAXRSS', peak_memory_mb())")
    out = tmp_path / "run"
    env = {**os.environ, "PEFTKIT_TENSORBOARD": "0"}
    r = subprocess.run([sys.executable, "-c", code, "train", *overrides, f"output_dir={out}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rss = float([line for line in r.stdout.splitlines() if line.startswith("MAXRSS")][-1].split()[1])
    summary = json.loads((out / "run_summary.json").read_text())
    print(f"predicted {summary['predicted_memory_mb']} MB, measured peak RSS {rss:.1f} MB "
          f"(summary {summary['peak_memory_mb']} MB)")
    return summary["predicted_memory_mb"], rss


SHORT = ["train.max_steps=2", "train.eval_every=0", "train.save_every=0", "train.warmup_steps=0", "train.batch_size=4",
         "data.max_length=64", "data.max_train_examples=16", "data.max_validation_examples=4", "train.threads=1"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_prediction_matches_peak_rss_tiny_lm(tiny_lm_dir, tmp_path, method):
    predicted, measured = _train_peak(tmp_path, [f"model={tiny_lm_dir}", f"method.name={method}", *SHORT])
    assert abs(predicted - measured) / measured < 0.25, (predicted, measured)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_prediction_matches_peak_rss_smollm2(tmp_path, method):
    predicted, measured = _train_peak(tmp_path, [f"method.name={method}", *SHORT])
    assert abs(predicted - measured) / measured < 0.25, (predicted, measured)
