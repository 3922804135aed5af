"""A run killed (SIGKILL) mid-training and resumed ends with the same adapter as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 8


def train_cmd(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peftkit", "train", f"model={model_dir}", f"data.train={data}", f"output_dir={out}",
            "train.max_steps=60", "train.save_every=5", "train.keep_checkpoints=2", "train.eval_every=20",
            "train.lr=3e-2", "train.batch_size=4", "train.threads=1", "method.dropout=0.1", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PEFTKIT_TENSORBOARD": "0", "HF_HUB_OFFLINE": "1"}


def test_kill_and_resume_gives_same_adapter(tiny_lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(train_cmd(tiny_lm_dir, data, ref), check=True, env=env(), capture_output=True)

    proc = subprocess.Popen(train_cmd(tiny_lm_dir, data, killed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000015").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "run_summary.json").exists()

    # without --resume the unfinished run is protected
    r = subprocess.run(train_cmd(tiny_lm_dir, data, killed), env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and "pass --resume" in r.stderr

    subprocess.run(train_cmd(tiny_lm_dir, data, killed) + ["--resume"], check=True, env=env(), capture_output=True)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    # the metrics of the resumed run continue the step count
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60
