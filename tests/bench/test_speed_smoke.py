"""Smoke run of bench/speed.py (issue #9): tiny models, every part, a few seconds; plus its FLOP count."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "speed.py"


def _speed_module():
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_quick_run_reports_every_part(tmp_path: Path) -> None:
    proc = _run("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "speed.md").read_text()
    for heading in ("Matmul peak", "LoRA training on real data", "Fixed-shape training step", "Generation latency"):
        assert heading in table
    data = json.loads((tmp_path / "speed.json").read_text())
    results = data["results"]
    assert set(results) == {"matmul", "step-gpt2", "step-llama", "gen", "real-rotten-tomatoes", "real-chatterbot"}
    for runs in results["real-rotten-tomatoes"]:
        r = runs[0]
        assert r["seconds"] > 0 and r["real_tokens"] > 0 and r["processed_tokens"] >= r["real_tokens"]
    timing = results["step-llama"][0][0]  # the timed configs run alternating in one process; then memory runs
    assert [c["stack"] for c in timing["job"]["configs"]][:3] == ["peftkit", "peft", "full"]
    lora, peft_lora, full = timing["configs"][:3]
    assert lora["trainable"] == peft_lora["trainable"] < full["trainable"]
    assert all(c["median_s"] > 0 and c["gflops"] > 0 for c in timing["configs"])
    assert [runs[0]["job"].get("variant") for runs in results["gen"]][-3:] == ["base", "merged", "unmerged"]


def test_worker_runs_in_its_own_process() -> None:
    proc = _run("--quick", "--subprocess", "--parts", "matmul")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32" in proc.stdout and "GFLOP/s" in proc.stdout


def test_flop_count_leaves_out_frozen_weight_gradients() -> None:
    """Full FT: 6 flops per weight per token (+ attention); LoRA: frozen weights cost 4, adapters 6."""
    speed = _speed_module()
    import peftkit

    spec = speed.QUICK_SHAPES["llama"]
    batch, seq = 2, 16
    full = speed.config_model(spec)
    matmul = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * batch * seq * seq * spec["hidden_size"] * spec["num_hidden_layers"]
    tokens = batch * seq
    assert speed.step_flops(full, batch, seq)["total"] == pytest.approx(6 * matmul * tokens + 3 * attn)
    lora = speed.config_model(spec)
    peftkit.inject(lora, peftkit.LoraConfig(r=4))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert speed.step_flops(lora, batch, seq)["total"] == pytest.approx(
        4 * matmul * tokens + 6 * adapters * tokens + 3 * attn)
