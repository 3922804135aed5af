"""``peftkit compare CONFIG --budget memory=2GB,time=10m``: which methods would fit, and why, before the comparison
trains anything.

Memory is :func:`peftkit.runs.memory.predict_memory` on the run's own data (what ``peftkit memory`` prints for the
run's config). Time is measured, not guessed: each run trains a few steps on its own data in a scratch folder
(``steps``, default 3; the first step, which allocates the optimizer, is not counted) and the seconds per step,
times the run's ``train.max_steps``, is its predicted training time. Nothing of the comparison is written.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError

_SIZE = {"kb": 2**-10, "mb": 1, "gb": 2**10, "tb": 2**20}
_TIME = {"s": 1, "m": 60, "h": 3600}


@dataclass
class Budget:
    """Attributes: memory_mb (peak), time_s (training); None: no limit."""

    memory_mb: float | None = None
    time_s: float | None = None


def parse_budget(text: str) -> Budget:
    """``memory=2GB,time=10m`` (memory in KB/MB/GB/TB, 1 GB = 1024 MB; time in s/m/h).

    Raises:
        ConfigError: naming the part that is not understood.
    """
    budget = Budget()
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "memory" and (m := re.fullmatch(r"([0-9.]+)\s*(kb|mb|gb|tb)", value)):
            budget.memory_mb = float(m.group(1)) * _SIZE[m.group(2)]
        elif key == "time" and (m := re.fullmatch(r"([0-9.]+)\s*([smh])", value)):
            budget.time_s = float(m.group(1)) * _TIME[m.group(2)]
        else:
            raise ConfigError(f"--budget: cannot read {part!r} (use memory=2GB and/or time=10m)")
    if budget.memory_mb is None and budget.time_s is None:
        raise ConfigError("--budget names no limit (use memory=2GB and/or time=10m)")
    return budget


def check_budget(runs: list[tuple[str, Any]], budget: Budget, steps: int = 3, log: Any = print) -> list[dict[str, Any]]:
    """Per run: ``{"label", "predicted_memory_mb", "s_per_step", "predicted_time_s", "fits", "why"}``."""
    from peftkit.runs.memory import build_meta_model, data_shape, predict_memory

    rows = []
    for label, cfg in runs:
        meta = build_meta_model(cfg)
        memory = predict_memory(cfg, meta, data_shape(cfg, meta)).total
        per_step = measure_step_seconds(cfg, steps) if budget.time_s is not None else None
        total = per_step * cfg.train.max_steps if per_step is not None else None
        why = []
        if budget.memory_mb is not None and memory > budget.memory_mb:
            why.append(f"predicted peak {memory:,.0f} MB > {budget.memory_mb:,.0f} MB")
        if total is not None and total > budget.time_s:
            why.append(f"{cfg.train.max_steps} steps x {per_step:.2f} s = {total:,.0f} s > {budget.time_s:,.0f} s")
        rows.append({"label": label, "predicted_memory_mb": round(memory, 1), "s_per_step": per_step,
                     "predicted_time_s": total, "fits": not why, "why": "; ".join(why) or "fits"})
        log(f"{label}: {rows[-1]['why']}")
    return rows


def measure_step_seconds(cfg: Any, steps: int = 3) -> float:
    """Median seconds per optimizer step over ``steps`` real steps (after the first) of ``cfg`` in a scratch
    folder."""
    import statistics

    from peftkit.runs.run import train_run

    if steps < 2:
        raise ConfigError(f"--budget-steps must be >= 2 (the first step is not timed), got {steps}")
    with tempfile.TemporaryDirectory(prefix="peftkit-budget-") as tmp:
        trial = replace(cfg, output_dir=str(Path(tmp) / "run"),
                        train=replace(cfg.train, max_steps=steps, eval_every=0, save_every=0, log_every=1,
                                      warmup_steps=0))
        train_run(trial, log=lambda _: None)
        stamps = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = sorted((r["step"], r["time"]) for r in stamps if "loss" in r and "time" in r)
    gaps = [b[1] - a[1] for a, b in zip(times, times[1:], strict=False)]
    if not gaps:
        raise ConfigError("the trial steps logged no times to measure")
    return statistics.median(gaps)


def format_budget(rows: list[dict[str, Any]], budget: Budget) -> str:
    limit = ", ".join(x for x in (f"memory {budget.memory_mb:,.0f} MB" if budget.memory_mb is not None else "",
                                  f"time {budget.time_s:,.0f} s" if budget.time_s is not None else "") if x)
    lines = [f"budget: {limit}", "| method | predicted peak (MB) | s/step | predicted time (s) | fits |", "|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["predicted_time_s"] is None else f"{r['predicted_time_s']:,.0f}"
        s = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        lines.append(f"| {r['label']} | {r['predicted_memory_mb']:,.0f} | {s} | {t} | "
                     f"{'yes' if r['fits'] else 'no: ' + r['why']} |")
    return "\n".join(lines)
