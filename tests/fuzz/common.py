"""Shared by the fuzz tests: bounded hypothesis settings and the "success or one clean line" check."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from peftkit.errors import PeftkitError

# Bounded, reproducible (derandomized: CI sees the same cases every run), and no example database in the tree.
FUZZ = settings(max_examples=60, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


_BASE = tempfile.mkdtemp(prefix="peftkit-fuzz-")
atexit.register(shutil.rmtree, _BASE, ignore_errors=True)


def fresh_dir() -> Path:
    """A new empty folder for one example (all removed when the test process exits)."""
    return Path(tempfile.mkdtemp(dir=_BASE))


def succeeds_or_clean_error(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: it must return, or raise a PeftkitError whose message is one short-enough line."""
    try:
        return fn()
    except PeftkitError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message[:500])
        assert "Traceback" not in message
        return e


def assert_cli_error(code: int, err: str) -> str:
    """Exit code 2 and exactly one stderr line starting ``peftkit: error:``."""
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err[-2000:]
    return lines[0]


def run_cli(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTKIT_TENSORBOARD": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)
