"""What the benchmarks share: one measurement per subprocess, alternation, memory, machine facts.

Every measurement runs in a fresh Python process (``python bench/X.py --worker JOB``) that prints one
``RESULT {json}`` line. A fresh process gives each configuration its own peak-memory figure (VmHWM) and
keeps one configuration's allocator state and thread pools from leaking into the next. The parent runs
the jobs of one comparison in turn (A B A B ...), so that a slow minute on a shared machine hits both
stacks alike, and reports medians and ratios: absolute times drift between runs, ratios within a run hold.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULT_TAG = "RESULT "
ROOT = Path(__file__).resolve().parents[1]


# -- memory of this process ----------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Resident memory now (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory since the process started or since :func:`reset_peak` (MB)."""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); silently a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# -- workers -------------------------------------------------------------------------------------
def worker_main(job_json: str, run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Body of ``--worker``: run one job, print its result as the last line (``RESULT {json}``)."""
    job = json.loads(job_json)
    base = rss_mb()  # after imports: the interpreter, torch and transformers
    reset_peak()
    result = run(job)
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    result.setdefault("base_rss_mb", round(base, 1))
    result["peak_delta_mb"] = round(result["peak_rss_mb"] - result["base_rss_mb"], 1)
    print(RESULT_TAG + json.dumps({"job": job, **result}), flush=True)


def run_worker(script: Path, job: dict[str, Any], timeout: float = 3600, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh process; its parsed RESULT (raises with its stderr on failure)."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"worker failed ({proc.returncode}) for {job}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    log(f"  {describe(job)}: {summary(result)}  [{time.perf_counter() - started:.0f}s]")
    return result


def describe(job: dict[str, Any]) -> str:
    return " ".join(f"{v}" for k, v in job.items() if k not in ("quick", "threads"))


def summary(result: dict[str, Any]) -> str:
    keys = [k for k in ("seconds", "median_s", "tokens_per_s", "gflops", "peak_delta_mb") if k in result]
    parts = [f"{k}={_fmt(result[k])}" for k in keys]
    for k in ("configs", "variants"):  # jobs that interleave several configurations
        if k in result:
            parts.append("median_s=" + "/".join(f"{c['median_s']:.3g}" for c in result[k]))
    return ", ".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def alternate(script: Path, jobs: list[dict[str, Any]], rounds: int, log: Callable[[str], Any] = print) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` in turn ``rounds`` times (A B C A B C ...); the results per job, in job order."""
    out: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for r in range(rounds):
        log(f" round {r + 1}/{rounds}")
        for i, job in enumerate(jobs):
            out[i].append(run_worker(script, job, log=log))
    return out


# -- statistics and timing -----------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# -- the machine ---------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, core count, vector capability, memory and library versions."""
    import torch
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        mem_gb = round(int(mem) / 2**20, 1)
    except OSError:
        mem_gb = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "load_average": [round(x, 1) for x in os.getloadavg()],  # other users of the CPU while this ran
    }
