"""The compare report on a tiny model: every file present and consistent with the runs."""

import json

import pytest

from peftkit.cli.main import main
from peftkit.errors import ConfigError
from peftkit.runs.compare import load_compare_config


def write_config(tmp_path, model_dir):
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"""
model: {model_dir}
data: {{train: rotten-tomatoes, max_length: 64, max_train_examples: 64, max_validation_examples: 8}}
train: {{max_steps: 3, batch_size: 4, lr: 1.0e-2, eval_every: 0, save_every: 0}}
eval: {{limit: 6, shots: [0, 2], forgetting_tokens: 64, latency_batch: 2}}
runs:
  - method: {{name: lora, r: 2, target_modules: [q_proj, v_proj]}}
  - label: lora-all
    method: {{name: lora, r: 4, target_modules: all-linear}}
    train: {{lr: 2.0e-2}}
output_dir: {tmp_path / "out"}
""")
    return cfg


def test_compare_writes_consistent_report_and_resumes(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    cfg = write_config(tmp_path, tiny_lm_dir)
    assert main(["compare", str(cfg)]) == 0
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "report.html", "quality_vs_params.png", "quality_vs_memory.png",
                 "loss_curves.png", "base.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[-2:] == ["lora", "lora-all"] and sum("shot" in x for x in labels) == 2
    lora, lora_all = report["rows"][-2:]
    for run, row in (("lora", lora), ("lora-all", lora_all)):
        summary = json.loads((out / run / "run_summary.json").read_text())
        ev = json.loads((out / run / "eval.json").read_text())
        assert row["trainable_params"] == summary["trainable_params"] > 0
        assert row["value"] == ev["accuracy"] and 0 <= row["value"] <= 1 and ev["n"] == 6
        assert row["adapter_bytes"] == sum(f.stat().st_size for f in (out / run / "adapter").rglob("*") if f.is_file())
        assert row["latency_merged_ms"] is not None  # LoRA merges
    assert lora_all["trainable_params"] > lora["trainable_params"]
    assert json.loads((out / "lora-all" / "config.yaml").read_text().split("lr: ")[1].split("\n")[0]) == 0.02
    md = (out / "report.md").read_text()
    assert "| lora-all |" in md and "test accuracy" in md
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == len(report["rows"]) + 1 and html.count("data:image/png;base64,") == 3

    # resumable: a second run trains nothing (the run folders are untouched)
    stamp = (out / "lora" / "run_summary.json").stat().st_mtime_ns
    assert main(["compare", str(cfg)]) == 0
    assert (out / "lora" / "run_summary.json").stat().st_mtime_ns == stamp


def test_compare_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="runs is empty"):
        load_compare_config(None).run_configs()
    with pytest.raises(ConfigError, match="label 'lora' is used twice"):
        load_compare_config(None, ["runs=[{method: lora}, {method: lora}]"]).run_configs()
    with pytest.raises(ConfigError, match=r"runs\[0\]: unknown config key 'method\.rank'"):
        load_compare_config(None, ["runs=[{method: {name: lora, rank: 3}}]"]).run_configs()
    with pytest.raises(ConfigError, match="unknown config key 'evl'"):
        load_compare_config(None, ["evl.limit=3"])
