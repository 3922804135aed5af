"""Smoke run of bench/speed.py (issue #9): tiny models, every part, a few seconds; plus its FLOP count."""

from __future__ import annotations

import importlib.util
import json
import statistics
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
    for column in ("s/step CPU", "GFLOP/s wall", "% of peak wall", "GFLOP/s CPU", "% of peak CPU", "switches/step",
                   "| llama | peftkit LoRA, plain loss |", "fp32 matmul peak in GFLOP/s, median over the rounds"):
        assert column in table
    data = json.loads((tmp_path / "speed.json").read_text())
    machine = data["machine"]
    assert len(machine["load_average"]) == len(machine["load_average_end"]) == 3
    assert set(machine["peftkit_fused_loss_default"]) == {"lm_loss_sum", "train.fused_loss"}
    results = data["results"]
    r32 = results["matmul"][0][0]
    assert r32["gflops"] > 0 and r32["gflops_cpu"] > 0
    assert set(results) == {"matmul", "step-gpt2", "step-llama", "gen", "real-rotten-tomatoes", "real-chatterbot"}
    for runs in results["real-rotten-tomatoes"]:
        r = runs[0]
        assert r["seconds"] > 0 and r["real_tokens"] > 0 and r["processed_tokens"] >= r["real_tokens"]
    for shape in ("gpt2", "llama"):
        _check_step_timing(results[f"step-{shape}"][0][0])  # the timed configs alternate in one process
        memory_jobs = [runs[0]["job"] for runs in results[f"step-{shape}"][1:]]  # then one memory run per config
        assert [j.get("fused_loss") for j in memory_jobs] == [True, False, None, True]
    assert [runs[0]["job"].get("variant") for runs in results["gen"]][-3:] == ["base", "merged", "unmerged"]


def _check_step_timing(timing: dict) -> None:
    specs = timing["job"]["configs"]
    assert [(c["stack"], c.get("fused_loss")) for c in specs] == [
        ("peftkit", True), ("peftkit", False), ("peft", None), ("full", True)]  # the loss path is always named
    lora, plain, peft_lora, full = timing["configs"]
    assert lora["trainable"] == plain["trainable"] == peft_lora["trainable"] < full["trainable"]
    assert lora["flops"] == plain["flops"]
    assert timing["threads"] == 1
    for c in timing["configs"]:
        assert len(c["times"]) == len(c["cpu_times"]) == len(c["nivcsw"]) == 2  # --quick: two rounds
        assert c["median_s"] > 0 and c["median_cpu_s"] > 0 and c["gflops"] > 0 and c["gflops_cpu"] > 0
        assert 0 < c["of_peak"] < 1.5 and 0 < c["of_peak_cpu"] < 1.5  # tiny models: far below the matmul peak
        assert 0 < c["on_cpu"] <= 1.2 and all(isinstance(n, int) and n >= 0 for n in c["nivcsw"])
        # the same optimizer settings on both stacks: fused AdamW, no weight decay, clipping at 1 (the Trainer's)
        assert c["fused_adamw"] and c["weight_decay"] == [0.0] and c["max_grad_norm"] == 1.0
    peak = timing["peak"]
    assert len(peak["rounds"]) == 2 and peak["gflops"] > 0 and peak["gflops_cpu"] > 0
    assert peak["gflops"] == pytest.approx(statistics.median(r["gflops"] for r in peak["rounds"]))
    load = timing["load"]
    assert len(load["load_average_start"]) == len(load["load_average_end"]) == 3
    assert load["nivcsw"] >= 0 and load["cpu_s"] > 0 and load["threads"] == 1


def test_cpu_time_is_divided_by_threads() -> None:
    """Two threads busy for 1 s of wall time: 2 CPU seconds, the same GFLOP/s by either clock, on CPU 1.0;
    half that CPU time (a descheduled second) leaves the CPU figure as it was and halves ``on_cpu``."""
    speed = _speed_module()
    info = {"flops": {"total": 10e9}, "trainable": 1}
    peak = {"gflops": 20.0, "gflops_cpu": 20.0}
    idle = speed.step_stats([(1.0, 2.0, 0), (1.0, 2.0, 0)], 1.0, info, 2, peak)
    assert idle["gflops"] == idle["gflops_cpu"] == pytest.approx(10.0) and idle["on_cpu"] == pytest.approx(1.0)
    assert idle["of_peak"] == idle["of_peak_cpu"] == pytest.approx(0.5)
    busy = speed.step_stats([(2.0, 2.0, 7), (2.0, 2.0, 9)], 1.0, info, 2, peak)
    assert busy["gflops"] == pytest.approx(5.0) and busy["gflops_cpu"] == pytest.approx(10.0)
    assert busy["on_cpu"] == pytest.approx(0.5) and busy["nivcsw_per_step"] == 8


def test_reference_settings_are_the_trainers_defaults(tmp_path: Path) -> None:
    """The PEFT step copies transformers' Trainer: its default optimizer, weight decay and clipping."""
    from transformers import TrainingArguments

    speed = _speed_module()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert str(getattr(args.optim, "value", args.optim)) == speed.REFERENCE["optim"]
    assert (args.weight_decay, args.max_grad_norm) == (speed.REFERENCE["weight_decay"], speed.REFERENCE["max_grad_norm"])


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
