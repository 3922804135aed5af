"""A run killed with SIGKILL at any moment (at a checkpoint boundary, in the middle of a checkpoint write,
at random times) leaves its last complete checkpoint loadable, and ``--resume`` ends with the same
adapter as an uninterrupted run. Real subprocesses, real kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 8

# Runs the CLI with checkpoint writes slowed down at one step: the weights file of that checkpoint is
# written, a marker file appears, then the process sleeps, so a kill lands in the middle of the write.
SLOW_WRITE = """
import sys, time
import peftkit.train.checkpoint as ck
real, marker, step = ck.save_file, sys.argv[1], int(sys.argv[2])
def slow(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if f".step-{step:06d}.tmp-" in path:
        open(marker, "w").close()
        time.sleep(120)
ck.save_file = slow
from peftkit.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def run_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [f"model={model_dir}", f"data.train={data}", f"output_dir={out}",
            "train.max_steps=60", "train.save_every=5", "train.keep_checkpoints=2", "train.eval_every=20",
            "train.lr=3e-2", "train.batch_size=4", "train.threads=1", "method.dropout=0.1"]


def train_cmd(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peftkit", "train", *run_args(model_dir, data, out), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PEFTKIT_TENSORBOARD": "0", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-data") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def reference(tiny_lm_dir, data, tmp_path_factory) -> dict:
    """The adapter of an uninterrupted run (in-process: same code, same seeds, as the subprocesses)."""
    from peftkit.runs.config import load_config
    from peftkit.runs.run import train_run

    out = tmp_path_factory.mktemp("resume-ref") / "ref"
    old = os.environ.get("PEFTKIT_TENSORBOARD")
    os.environ["PEFTKIT_TENSORBOARD"] = "0"
    try:
        train_run(load_config(None, run_args(tiny_lm_dir, data, out)), show_progress=False, log=lambda *a: None)
    finally:
        os.environ.pop("PEFTKIT_TENSORBOARD") if old is None else os.environ.__setitem__("PEFTKIT_TENSORBOARD", old)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(reference: dict, out: Path) -> None:
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert reference.keys() == b.keys() and reference
    for k in reference:
        assert (reference[k] - b[k]).abs().max() <= 1e-6, k


def assert_loadable(model_dir: Path, data: Path, checkpoint: Path) -> int:
    """Load ``checkpoint`` into a fresh model + optimizer the way --resume does; return its step."""
    import torch

    import peftkit
    from peftkit.runs.config import load_config
    from peftkit.train.checkpoint import load_checkpoint
    from peftkit.train.optim import make_optimizer, make_scheduler

    cfg = load_config(None, run_args(model_dir, data, checkpoint.parent.parent))
    from peftkit.models import load_model

    model = load_model(str(model_dir))[0]
    torch.manual_seed(0)
    peftkit.inject(model, cfg.method_config())
    opt = make_optimizer(model, cfg.train)
    return load_checkpoint(checkpoint, model, opt, make_scheduler(opt, cfg.train)).step


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def loss_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_kill_during_checkpoint_write_and_at_random_times(tiny_lm_dir, data, reference, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"

    # 1. killed in the middle of writing checkpoint 10: its weights file is on disk, the rest is not
    marker = tmp_path / "mid-write"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(marker), "10", "train",
                             *run_args(tiny_lm_dir, data, out)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker.exists, proc)
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".step-000010.tmp-")]
    assert len(partial) == 1 and (partial[0] / "trainable.safetensors").exists()
    kill(proc)
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == ["step-000005"]
    assert assert_loadable(tiny_lm_dir, data, ckpts / "step-000005") == 5

    # 2. without --resume the unfinished run is protected
    r = subprocess.run(train_cmd(tiny_lm_dir, data, out), env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and "pass --resume" in r.stderr

    # 3. resumed and killed the moment a checkpoint is complete (before old ones are rotated out)
    proc = subprocess.Popen(train_cmd(tiny_lm_dir, data, out, "--resume"), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: (ckpts / "step-000020").exists(), proc)
    kill(proc)
    assert not (out / "run_summary.json").exists()

    # 4. resumed, then killed at a random moment (a seeded draw, printed on failure)
    from peftkit.train.checkpoint import list_checkpoints

    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.5, 6.0)
    proc = subprocess.Popen(train_cmd(tiny_lm_dir, data, out, "--resume"), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: list_checkpoints(out)[-1].name > "step-000020", proc)  # past start-up
    time.sleep(delay)
    if proc.poll() is None:
        kill(proc)
    if not (out / "run_summary.json").exists():  # killed mid-run: the last checkpoint is whole
        last = list_checkpoints(out)[-1]
        assert assert_loadable(tiny_lm_dir, data, last) == int(last.name[5:]), f"seed {seed}: {delay:.2f} s"
    # else: the run finished (the summary is its last write) before or as the kill landed: nothing more to test

    # 5. resumed to the end: the same adapter as a run never interrupted; leftovers of the kills removed
    if not (out / "run_summary.json").exists():
        subprocess.run(train_cmd(tiny_lm_dir, data, out, "--resume"), check=True, env=env(), capture_output=True)
    assert_same_adapter(reference, out)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000050", "step-000055"]
    steps = loss_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # no step logged twice, no torn line
