"""Where training reports go: a progress bar, ``metrics.jsonl``, TensorBoard, and a loss-curve PNG."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: max allocated on CUDA, else peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM belongs to this process image; ru_maxrss survives exec, so a child started from a big process
    # (a test runner) would report its parent's peak
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_memory_mb(device: torch.device | None = None) -> float:
    """Memory this process holds now: allocated on CUDA, else resident set size (VmRSS)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _status_mb("VmRSS")
    return 0.0 if rss is None else rss  # not Linux: unknown (the peak still has ru_maxrss)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MB, or None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Start peak-memory accounting afresh (several runs in one process each report their own peak).

    CPU: writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0); CUDA: torch's peak statistics.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process
        pass


class Tracker:
    """Logs metrics to every sink. On a terminal a progress bar shows loss, lr, tokens/s and ETA; otherwise
    (a pipe, a log file, CI, nohup) each logged step prints one plain line with the same facts and the RSS."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, show_progress: bool | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.console = Console(stderr=True)
        show = sys.stderr.isatty() if show_progress is None else show_progress
        self.lines = show_progress is None and not show  # chosen for a terminal-less run, not silenced by the caller
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not show,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self._tb = None
        if os.environ.get("PEFTKIT_TENSORBOARD", "1") != "0":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: the JSONL file still has everything
                self._tb = None
        self.progress.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if "loss" in metrics:
            info = f"loss {metrics['loss']:.4f}  lr {metrics.get('lr', 0):.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
            self.progress.update(self.task, info=info)
            if self.lines:
                print(progress_line(step, self.total_steps, metrics, self.start_step, time.perf_counter() - self.started),
                      flush=True)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        self.progress.stop()
        if self._tb is not None:
            self._tb.close()


class NullTracker:
    """What ranks other than 0 log to (and any rank before its output folder is open): nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def advance(self, step: int) -> None: ...
    def print(self, message: str) -> None: ...
    def close(self) -> None: ...


def progress_line(step: int, total: int, metrics: dict[str, Any], start_step: int, elapsed: float) -> str:
    """``step 20/60  loss 2.1043  lr 1.00e-03  1,234 tok/s  eta 1m05s  rss 2,210 MB``: the bar's facts as plain text."""
    done = step - start_step
    eta = elapsed / done * (total - step) if done > 0 else 0.0
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}", f"lr {metrics.get('lr', 0):.2e}",
             f"{metrics.get('tokens_per_s', 0):,.0f} tok/s", f"eta {int(eta // 60)}m{int(eta % 60):02d}s"]
    if metrics.get("rss_mb") is not None:
        parts.append(f"rss {metrics['rss_mb']:,.0f} MB")
    return "  ".join(parts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_file: Path, out_png: Path) -> Path | None:
    """Training and validation loss against step, as a PNG."""
    rows = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
