"""Smoke run of bench/levers.py (issue #9's single levers): tiny shapes, every part, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "levers.py"


def test_quick_run_reports_every_part(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "levers.json").read_text())["rows"]
    assert {r["part"] for r in rows} == {"lora-layer", "shared-a", "loss", "step"}
    assert all(r["median_ms"] > 0 for r in rows if not r["variant"].startswith("saved"))
    loss = {r["variant"] for r in rows if r["part"] == "loss"}
    assert {"plain", "fused", "recompute-128"} <= loss  # the variants agreed on loss and gradients, else it raised
    step = [r["variant"] for r in rows if r["part"] == "step"]
    assert step.count("PEFT") == 2 and step.count("peftkit, fused loss") == 2  # both shapes
    assert "| step |" in (tmp_path / "levers.md").read_text()
