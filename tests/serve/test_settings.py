"""Unit tests of :mod:`peftkit.serve.settings`: which workers are dead, ``--model NAME=PATH`` items, the lease."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.errors import ConfigError
from peftkit.serve.settings import ServeSettings, parse_models, worker_is_dead, worker_name

HOST = socket.gethostname()


def test_worker_name_is_host_and_pid():
    assert worker_name() == f"{HOST}:{os.getpid()}"


def test_this_process_is_not_dead():
    assert worker_is_dead(worker_name()) is False


def test_a_pid_that_exited_on_this_host_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert worker_is_dead(f"{HOST}:{child.pid}") is True


def test_a_zombie_on_this_host_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
        assert worker_is_dead(f"{HOST}:{child.pid}") is True
    finally:
        child.wait()


def test_a_process_of_another_host_is_never_judged_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert worker_is_dead(f"not-{HOST}:{child.pid}") is False
    assert worker_is_dead(f"{HOST}.other:{child.pid}") is False


@pytest.mark.parametrize("name", [None, "", "garbage", f"{HOST}:", f"{HOST}:abc", f"{HOST}:-1", f"{HOST}:1"])
def test_names_that_are_not_a_dead_pid_here_are_not_dead(name):
    assert worker_is_dead(name) is False  # pid 1 runs (as another user: PermissionError, or ours: alive)


def test_parse_models(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    odd = tmp_path / "with=sign"  # split at the first '=': the path may hold one
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    assert parse_models([]) == {}
    assert parse_models([f"tiny={base}/../base", f"other={odd}"]) == {"tiny": str(base.resolve()),
                                                                      "other": str(odd.resolve())}


@pytest.mark.parametrize("item", ["tiny", "=path", "tiny=", "="])
def test_parse_models_needs_name_and_path(item):
    with pytest.raises(ConfigError) as info:
        parse_models([item])
    assert str(info.value) == f"--model {item!r}: expected NAME=PATH"


def test_parse_models_needs_a_model_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError) as info:
            parse_models([f"tiny={path}"])
        assert str(info.value) == f"--model tiny={path}: not a model folder (no config.json)"


def test_parse_models_reports_the_first_bad_item(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="^--model 'bad': expected NAME=PATH$"):
        parse_models([f"good={tmp_path}", "bad", "worse="])


def test_the_lease_must_outlast_three_polls(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        ServeSettings(tmp_path, lease_s=3.0, poll_s=1.0)
    assert str(info.value) == "--lease (3.0 s) must be more than three polls (1.0 s each)"
    assert ServeSettings(tmp_path, lease_s=3.1, poll_s=1.0).lease_s == 3.1


def test_base_path_names_registered_models_and_refuses_others(tmp_path: Path):
    settings = ServeSettings(tmp_path / "x" / "..", models={"tiny": "/bases/tiny"})
    assert settings.storage == tmp_path.resolve()
    assert settings.base_path("tiny") == "/bases/tiny"
    assert settings.bases()[-1] == "tiny"
    with pytest.raises(ConfigError, match="^model 'nope' does not exist or you do not have access to it"):
        settings.base_path("nope")
