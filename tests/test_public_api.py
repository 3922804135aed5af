"""``import peftkit``: one table of public names, loaded lazily (PEP 562), nothing heavy imported up front."""

from __future__ import annotations

import importlib
import subprocess
import sys

import peftkit


def test_every_public_name_comes_from_the_table_and_resolves():
    assert sorted(peftkit.__all__) == sorted(peftkit._EXPORTS)
    assert set(peftkit._EXPORTS) <= set(dir(peftkit))
    for name, module in peftkit._EXPORTS.items():
        assert getattr(peftkit, name) is getattr(importlib.import_module(module), name)
    assert peftkit.QLoraConfig.method_name == "qlora"


def test_import_peftkit_loads_no_torch():
    code = "import sys, peftkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
