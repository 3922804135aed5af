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
    from peftkit.eval.stats import binomial_interval

    best = max(report["rows"], key=lambda r: r["value"])
    for row in report["rows"]:  # every score has its interval; every other row is tested against the best
        k = round(row["value"] * row["n"])
        assert row["interval"] == pytest.approx(list(binomial_interval(k, row["n"])))
        assert row["interval"][0] <= row["value"] <= row["interval"][1]
        if row is best:
            assert row["vs_best"] == "best" and row["p_vs_best"] is None
        else:
            assert 0 < row["p_vs_best"] <= 1 and row["vs_best"].endswith(f"(p={row['p_vs_best']:.2g})")
        assert "per_example" not in row
    assert json.loads((out / "lora-all" / "config.yaml").read_text().split("lr: ")[1].split("\n")[0]) == 0.02
    md = (out / "report.md").read_text()
    assert "| lora-all |" in md and "test accuracy" in md and "95% interval" in md and "| best |" in md
    assert "## Recommendation" in md and report["recommendation"][0].startswith("Best accuracy: ")
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


def _row(label, value, kind="fine-tuned", **kw):
    return {"label": label, "kind": kind, "metric": "accuracy", "value": value, "n": 100, **kw}


def test_recommendation_follows_the_table():
    from peftkit.runs.compare import add_uncertainty, pareto_front, recommendation

    same = [1.0] * 80 + [0.0] * 20
    rows = [_row("base 0-shot", 0.6, "in-context", per_example=[1.0] * 60 + [0.0] * 40),
            _row("lora", 0.8, per_example=same, peak_memory_mb=900, trainable_params=10, train_time_s=50,
                 latency_ms=5.0, latency_merged_ms=2.0),
            _row("ia3", 0.79, per_example=[1.0] * 79 + [0.0] * 21, peak_memory_mb=700, trainable_params=2,
                 train_time_s=60, latency_ms=6.0, latency_merged_ms=2.1),
            _row("full", 0.62, per_example=[1.0] * 62 + [0.0] * 38, peak_memory_mb=3000, trainable_params=1000,
                 train_time_s=200, latency_ms=2.0, latency_merged_ms=None)]
    add_uncertainty(rows)
    assert [r["vs_best"].split(" (")[0] for r in rows] == ["worse", "best", "not distinguishable", "worse"]
    text = "\n".join(recommendation(rows))
    assert "Best accuracy: lora, 0.800 (95% interval" in text
    assert "Not distinguishable from it on these test examples: ia3." in text
    assert "Among those, the least peak memory: ia3 (700 MB)." in text
    assert "Among those, the least trainable parameters: ia3 (2)." in text
    assert "Among those, the least training time: lora (50 s)." in text
    assert pareto_front(rows, "peak_memory_mb") == ["lora", "ia3"]  # full: worse and dearer
    assert pareto_front(rows, "latency") == ["lora"]  # full (2.0 ms unmerged) ties lora merged, scoring lower
