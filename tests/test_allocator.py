"""peftkit.allocator: when the ``peftkit`` command re-executes under jemalloc, and what it says about it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peftkit import allocator
from peftkit.allocator import GUARD, AllocatorError, plan, preloaded

LIB = "/opt/lib/libjemalloc.so.2"


def test_auto_preloads_the_library_found_and_marks_the_child():
    env = plan({"PATH": "/bin"}, platform="linux", find=lambda: LIB)
    assert env["LD_PRELOAD"] == LIB
    assert env[GUARD] == LIB
    assert env["PATH"] == "/bin"


def test_a_users_preload_is_kept_after_ours():
    env = plan({"LD_PRELOAD": "/x/libiomp5.so"}, platform="linux", find=lambda: LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libiomp5.so"


@pytest.mark.parametrize("environ", [
    {"PEFTKIT_ALLOCATOR": "system"},
    {"PEFTKIT_ALLOCATOR": "SYSTEM"},
    {GUARD: LIB},  # the re-executed process: never twice
    {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},  # the user chose an allocator
    {"LD_PRELOAD": "libjemalloc.so.2"},
])
def test_no_reexec(environ):
    assert plan(environ, platform="linux", find=lambda: LIB) is None


def test_auto_without_jemalloc_or_off_linux_stays_quietly():
    assert plan({}, platform="linux", find=lambda: None) is None
    assert plan({}, platform="darwin", find=lambda: LIB) is None


def test_jemalloc_asked_for_but_missing_is_a_one_line_error():
    with pytest.raises(AllocatorError, match=r"PEFTKIT_ALLOCATOR=jemalloc: jemalloc is not installed .*libjemalloc2"):
        plan({"PEFTKIT_ALLOCATOR": "jemalloc"}, platform="linux", find=lambda: None)
    with pytest.raises(AllocatorError, match="Linux only"):
        plan({"PEFTKIT_ALLOCATOR": "jemalloc"}, platform="darwin", find=lambda: LIB)


def test_unknown_choice_and_missing_library_path_are_errors(tmp_path):
    with pytest.raises(AllocatorError, match=r"PEFTKIT_ALLOCATOR='tcmalloc': unknown allocator \(choose one of auto"):
        plan({"PEFTKIT_ALLOCATOR": "tcmalloc"}, platform="linux", find=lambda: LIB)
    missing = tmp_path / "libjemalloc.so.2"
    with pytest.raises(AllocatorError, match=f"PEFTKIT_JEMALLOC={missing}: no such file"):
        plan({"PEFTKIT_JEMALLOC": str(missing)}, platform="linux", find=lambda: LIB)
    missing.write_bytes(b"")
    assert plan({"PEFTKIT_JEMALLOC": str(missing)}, platform="linux", find=lambda: LIB)["LD_PRELOAD"] == str(missing)


def test_malloc_conf_of_the_user_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "MALLOC_CONF", "background_thread:true")
    assert plan({}, platform="linux", find=lambda: LIB)["MALLOC_CONF"] == "background_thread:true"
    assert plan({"MALLOC_CONF": "narenas:1"}, platform="linux", find=lambda: LIB)["MALLOC_CONF"] == "narenas:1"


def test_preloaded_names_the_allocator():
    assert preloaded({"LD_PRELOAD": "/a/libiomp5.so:/b/libjemalloc.so.2"}) == "jemalloc"
    assert preloaded({"LD_PRELOAD": "/b/libmimalloc.so /a/x.so"}) == "mimalloc"
    assert preloaded({"LD_PRELOAD": "/a/libiomp5.so"}) is None
    assert preloaded({}) is None


def test_find_jemalloc_searches_the_folders_given(tmp_path, monkeypatch):
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    assert allocator.find_jemalloc([str(tmp_path)]) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.find_jemalloc([str(tmp_path)]) == str(tmp_path / "libjemalloc.so.2")


def _info(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m peftkit info`` (the console command's path) with a clean allocator environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", GUARD, "PEFTKIT_ALLOCATOR", "PEFTKIT_JEMALLOC")}
    return subprocess.run([sys.executable, "-m", "peftkit", "info"], capture_output=True, text=True,
                          env={**env, **extra_env}, timeout=120)


def test_command_runs_under_jemalloc_where_installed_and_can_be_told_not_to():
    r = _info({})
    assert r.returncode == 0, r.stderr
    if allocator.find_jemalloc() is not None and sys.platform.startswith("linux"):
        assert "memory allocator: jemalloc (PEFTKIT_ALLOCATOR=system for the system's malloc)" in r.stdout
    else:  # auto without jemalloc: the system's malloc, and the line says how to get jemalloc
        assert "memory allocator: the system's malloc (jemalloc not found: Debian/Ubuntu `apt-get install " \
               "libjemalloc2` lowers peak memory)" in r.stdout
    r = _info({"PEFTKIT_ALLOCATOR": "system"})
    assert r.returncode == 0, r.stderr
    assert "memory allocator: the system's malloc (PEFTKIT_ALLOCATOR=system)" in r.stdout


def test_command_errors_on_a_bad_choice_before_doing_anything(tmp_path):
    r = _info({"PEFTKIT_ALLOCATOR": "jemalloc", "PEFTKIT_JEMALLOC": str(tmp_path / "nope.so")})
    assert r.returncode == 2
    assert r.stderr.strip() == f"peftkit: error: PEFTKIT_JEMALLOC={tmp_path / 'nope.so'}: no such file"
    assert r.stdout == ""


def test_main_called_in_process_never_reexecutes(monkeypatch, capsys):
    """Tests and library callers use ``main()``: it must not replace their process."""
    from peftkit.cli.main import main

    monkeypatch.setenv("PEFTKIT_ALLOCATOR", "jemalloc")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("main() re-executed"))
    assert main(["info"]) == 0
    assert "memory allocator:" in capsys.readouterr().out


_RELEASE = """
import torch
from peftkit.allocator import in_use, release_free_memory

def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024

big = torch.ones(64 * 2**20)  # 256 MiB touched
del big
before = rss()
print(in_use(), release_free_memory(), before - rss())
"""


def _release(env_extra: dict[str, str]) -> tuple[str, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    r = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, env={**env, **env_extra},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    name, done, dropped = r.stdout.split()
    return name, done, float(dropped)


def test_release_free_memory_hands_kept_pages_back_under_jemalloc_only():
    name, done, _ = _release({})  # the system's malloc: nothing to ask, nothing done
    assert (name, done) == ("system", "False")
    lib = allocator.find_jemalloc()
    if lib is not None and sys.platform.startswith("linux"):
        name, done, dropped = _release({"LD_PRELOAD": lib, "MALLOC_CONF": allocator.MALLOC_CONF or "dirty_decay_ms:-1"})
        assert (name, done) == ("jemalloc", "True")
        assert dropped > 200  # MB: kept by jemalloc (never purged) until released


def test_the_default_never_keeps_freed_pages_for_good():
    """Issue #16: jemalloc with purging off (decay -1) grew the demo to 18 GB on variable-shape batches. Whatever
    peftkit sets for jemalloc must let it hand pages back."""
    env = plan({}, platform="linux", find=lambda: LIB)
    conf = env.get("MALLOC_CONF") or ""
    assert "decay_ms:-1" not in conf.replace(" ", "")


def test_process_memory_helpers_live_here_and_import_no_torch():
    """All process-memory code is in peftkit.allocator, which the console command imports before torch."""
    code = ("import sys; import peftkit.allocator as a; "
            "print(all(callable(getattr(a, n)) for n in ('trim_heap', 'file_backed', 'release_file_pages', "
            "'file_mappings', 'glibc_heap_keeps_freed_memory', 'release_free_memory')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_heap_trim_and_page_release_leave_values_alone(tmp_path):
    """``trim_heap`` never fails; ``release_file_pages`` on anonymous memory does nothing (it would zero it)."""
    import torch

    t = torch.arange(4096 * 4, dtype=torch.float32)
    allocator.trim_heap()
    assert not allocator.file_backed(t)
    allocator.release_file_pages(t)
    assert torch.equal(t, torch.arange(4096 * 4, dtype=torch.float32))


def test_glibc_heap_term_is_off_under_mmap_threshold_or_another_allocator(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.glibc_heap_keeps_freed_memory()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not allocator.glibc_heap_keeps_freed_memory()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", LIB)
    assert not allocator.glibc_heap_keeps_freed_memory()
