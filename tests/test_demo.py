"""The README's main job, `peftkit demo`, through the console path (its allocator choice included), shortened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 30  # issue #16: long enough for memory kept per batch shape to show (the demo grew 1.4 -> 2.2 GB by step 16
# under jemalloc with pages never returned), short enough for the suite


@pytest.mark.slow
def test_demo_trains_reports_and_its_memory_line_holds(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PEFTKIT_TENSORBOARD": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "peftkit", "demo", "--output-dir", str(out), "--steps", str(STEPS),
                        "--eval-examples", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "demo_results.json").read_text())
    assert result["steps"] == STEPS and result["eval_examples"] == 8
    assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0
    assert result["sample_generation"].strip()
    summary = json.loads((out / "run_summary.json").read_text())
    # the demo holds one model at a time, so the training's peak is what the predictor describes (issue #6: +-25%)
    predicted, measured = summary["predicted_memory_mb"], summary["peak_memory_mb"]
    assert abs(predicted - measured) / measured <= 0.25, (predicted, measured)
    assert f"measured {measured:.0f} MB (allocator: " in r.stderr + r.stdout
    # memory held flat from warm-up (step 15: half of a run under 40 steps) to the end: single readings under jemalloc's timed purging vary by
    # +-10% (a 300-step run: 973-1,160 MB), kept pages grew +60% in 13 steps
    assert summary["rss_warmup_step"] == min(20, STEPS // 2) and summary["rss_growth_percent"] <= 20, summary
