"""Smoke run of bench/allocator.py: the tiny model under glibc and under peftkit's jemalloc settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from peftkit.allocator import MALLOC_CONF, find_jemalloc

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "allocator.py"


def test_each_worker_runs_under_the_allocator_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "alloc.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--variants", "lora", "--rounds", "1",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if find_jemalloc() is None:  # nothing to compare with: a one-line error and a non-zero exit, no report
        assert proc.returncode != 0 and not out.exists()
        assert proc.stderr.strip().splitlines()[-1] == \
            "bench/allocator.py: jemalloc not found (apt-get install libjemalloc2)"
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ran = {r["allocator"]: r["ran_under"] for r in report["runs"]}
    assert ran == {"glibc": "system", "peftkit": "jemalloc"}  # what /proc/self/maps of each worker showed
    assert report["envs"]["peftkit"]["MALLOC_CONF"] == MALLOC_CONF
    assert all(r["peak_rss_mb"] > 100 and r["median_step_cpu_s"] > 0 for r in report["runs"])
    assert "| lora | peftkit |" in out.with_suffix(".md").read_text()
