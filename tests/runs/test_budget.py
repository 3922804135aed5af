"""``peftkit compare --budget``: the limits read, the predicted peak equal to ``peftkit memory``'s for the run's
config, the time from measured steps, and nothing of the comparison written."""

from __future__ import annotations

import json

import pytest

from peftkit.cli.main import main
from peftkit.core.config import to_dict
from peftkit.errors import ConfigError
from peftkit.runs.budget import Budget, check_budget, parse_budget
from peftkit.runs.compare import load_compare_config
from tests.runs.test_compare import write_config


def test_parse_budget() -> None:
    assert parse_budget("memory=2GB,time=10m") == Budget(2048.0, 600.0)
    assert parse_budget(" time = 90s ") == Budget(None, 90.0)
    assert parse_budget("memory=512mb") == Budget(512.0, None)
    for bad, part in (("memory=2 parsecs", "memory=2 parsecs"), ("speed=3", "speed=3")):
        with pytest.raises(ConfigError, match=f"cannot read '{part}'"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="names no limit"):
        parse_budget(",")


def test_budget_agrees_with_peftkit_memory(tiny_lm_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    cfg_file = write_config(tmp_path, tiny_lm_dir)
    runs = load_compare_config(str(cfg_file)).run_configs()
    rows = check_budget(runs, Budget(memory_mb=1e6, time_s=1e6), steps=3, log=lambda _: None)
    for (label, run_cfg), row in zip(runs, rows, strict=True):
        run_cfg_file = tmp_path / f"{label}.yaml"
        as_file = {**to_dict(run_cfg), "method": run_cfg.method_config().to_dict()}  # the very run config
        run_cfg_file.write_text(json.dumps(as_file))
        capsys.readouterr()
        assert main(["memory", str(run_cfg_file), "--json"]) == 0
        predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total"]
        assert row["predicted_memory_mb"] == pytest.approx(predicted, abs=0.1)
        assert row["s_per_step"] > 0 and row["predicted_time_s"] == pytest.approx(row["s_per_step"] * 3)
        assert row["fits"] and row["why"] == "fits"
    tight = check_budget(runs[:1], Budget(memory_mb=1.0), log=lambda _: None)[0]
    assert not tight["fits"] and tight["why"].startswith("predicted peak") and tight["s_per_step"] is None
    assert main(["compare", str(cfg_file), "--budget", "memory=1MB"]) == 0
    out = capsys.readouterr().out
    assert "| lora |" in out and "no: predicted peak" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing of the comparison
