"""Smoke run of bench/memory.py (issue #6): the tiny Llama, full / LoRA / QLoRA, in a few seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_field(tmp_path: Path, capsys) -> None:
    bench = _bench()
    out = tmp_path / "memory.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == list(bench.QUICK_VARIANTS)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["model"] == "tiny" and (r["batch"], r["seq"]) == (2, 32)
        assert r["weights_mb"] > 0 and r["peak_rss_mb"] > 0 and r["runtime_rss_mb"] > 0  # in process: indicative
        assert r["predicted_mb"] > 0 and r["predicted"]["weights"] > 0
        assert len(r["step_s"]) == 2 and r["median_step_s"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
    full, lora, qlora, small = rows["full"], rows["lora"], rows["qlora"], rows["qlora-small"]
    assert full["trainable_params"] == full["base_params"] == 434_816  # every parameter trains
    assert lora["trainable_params"] == qlora["trainable_params"] < full["trainable_params"] / 10
    assert full["base_bytes_per_param"] == lora["base_bytes_per_param"] == 4.0
    # NF4 with double quantization: 4.13 bits per quantized weight; the whole base under 1 byte per parameter
    # once the embedding is bf16 and the head NF4 too
    assert qlora["quantized_bytes_per_param"] == pytest.approx(4.13 / 8, abs=0.005)
    assert small["quantized_bytes_per_param"] == pytest.approx(4.13 / 8, abs=0.005)
    assert qlora["base_bytes_per_param"] < 1.1 and small["base_bytes_per_param"] < 1.0
    assert small["weights_mb"] < qlora["weights_mb"] < lora["weights_mb"]
    assert small["predicted"]["weights"] < qlora["predicted"]["weights"] < lora["predicted"]["weights"]
    # the table, the targets, and the optimizer timing are all there
    table = out.with_suffix(".md").read_text()
    for word in ("| variant |", "peak RSS MB", "predicted MB", "qlora-small", "Issue #6 targets", "AdamW8bit"):
        assert word in table
    assert table in capsys.readouterr().out
    assert {t["variant"] for t in report["targets"]} == {"qlora", "qlora-small"}
    assert report["optimizer_ratio"]["ratio"] > 0
    assert report["machine"]["torch"] and report["command"].endswith("--quick --out " + str(out))


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown variant 'qlora-3bit'"):
        _bench().main(["--quick", "--variants", "lora,qlora-3bit", "--no-optimizer-ratio"])


@pytest.mark.slow
def test_worker_process_reports_its_own_peak() -> None:
    """The real path: one configuration in a fresh process."""
    bench = _bench()
    job = {"model": "tiny", "variant": "qlora", "batch": 2, "seq": 32, "steps": 1, "checkpointing": True,
           "threads": 1, "optimizer": "adamw"}
    r = bench.run_worker(job, timeout=300)
    assert r["status"] == "ok", r
    assert r["peak_rss_mb"] >= r["build_peak_mb"] > r["runtime_rss_mb"] > 100
    assert r["quantized_bytes_per_param"] == pytest.approx(4.13 / 8, abs=0.005)
