"""Atomic writes publish folders and files with the permissions a plain write would give them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import peftkit
from peftkit.core.files import atomic_dir, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_dir_publishes_usual_permissions(tmp_path, umask_022):
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))  # safetensors writes 0600
        (tmp / "a.txt").write_text("x")
    assert _mode(tmp_path / "out") == 0o755  # mkdtemp made it 0700
    assert _mode(tmp_path / "out" / "sub") == 0o755
    assert _mode(tmp_path / "out" / "sub" / "w.safetensors") == 0o644
    assert _mode(tmp_path / "out" / "a.txt") == 0o644


def test_saved_adapter_is_readable_by_others(tiny_llama, tmp_path, umask_022):
    model = peftkit.inject(tiny_llama.build(), peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "adapter")
    modes = {p.name: _mode(p) for p in (tmp_path / "adapter").iterdir()}
    assert _mode(tmp_path / "adapter") == 0o755
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_atomic_write_text_honours_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "f.txt", "hi")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.txt") == 0o600 and (tmp_path / "f.txt").read_text() == "hi"
