"""``peftkit compare``: several methods on one task with the same budget, and a report of the trade-offs.

Each run trains with the shared ``train`` settings (a run may override some, e.g. its learning rate),
then is scored on the same test examples. The report has, per method: trainable parameters (count and
% of the model), adapter size on disk, peak memory, training time and tokens/s, the test metric,
forward latency with the adapter unmerged and merged, and forgetting (perplexity change on held-out
general text), next to zero-/few-shot rows of the untouched base model. Finished runs are not re-run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.config import from_dict, to_dict
from peftkit.core.files import atomic_write_text
from peftkit.errors import ConfigError
from peftkit.runs.config import DataConfig, RunConfig, apply_override, read_yaml_mapping
from peftkit.train.config import TrainConfig


@dataclass
class EvalSettings:
    """Attributes:
        limit: test examples scored per method (a seeded shuffle of the test split).
        shots: in-context baselines on the base model (0 = zero-shot).
        forgetting_tokens: tokens of held-out general text (hamlet.txt) for the perplexity check; 0 skips it.
        latency_batch: test prompts in the batch timed for inference latency.
    """

    limit: int = 200
    shots: list[int] = field(default_factory=lambda: [0, 4])
    forgetting_tokens: int = 2048
    latency_batch: int = 8


@dataclass
class CompareConfig:
    """Attributes:
        model: the base model for every run.
        data: the task (same for every run).
        train: the shared budget; each run may override fields in its own ``train``.
        runs: ``[{method: {name: ..., ...}, train: {...}, label: ...}, ...]``.
        eval: how runs are scored.
        output_dir: one folder per run plus the report files.
    """

    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runs: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalSettings = field(default_factory=EvalSettings)
    output_dir: str = "runs/compare"

    def run_configs(self) -> list[tuple[str, RunConfig]]:
        """(label, full run config) for each run, validated."""
        if not self.runs:
            raise ConfigError("runs is empty: list the methods to compare")
        out, seen = [], set()
        for i, run in enumerate(self.runs):
            if not isinstance(run, dict) or "method" not in run:
                raise ConfigError(f"runs[{i}] must be a mapping with a 'method' section")
            unknown = set(run) - {"method", "train", "label"}
            if unknown:
                raise ConfigError(f"runs[{i}]: unknown key {sorted(unknown)[0]!r} (use method, train, label)")
            method = run["method"] if isinstance(run["method"], dict) else {"name": run["method"]}
            label = str(run.get("label") or method.get("name", f"run{i}"))
            if label in seen:
                raise ConfigError(f"runs[{i}]: label {label!r} is used twice; give each run a distinct label")
            seen.add(label)
            train = {**to_dict(self.train), **(run.get("train") or {})}
            try:
                cfg = from_dict(RunConfig, {"model": self.model, "method": method, "data": to_dict(self.data),
                                            "train": train, "output_dir": str(Path(self.output_dir) / label)})
                cfg.method_config()
            except ConfigError as e:
                raise ConfigError(f"runs[{i}]: {e}") from None
            out.append((label, cfg))
        return out


def load_compare_config(path: str | Path | None, overrides: list[str] = ()) -> CompareConfig:
    data = read_yaml_mapping(path) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(CompareConfig, data)


def compare(cfg: CompareConfig, log=print) -> dict[str, Any]:
    """Train and score every run (skipping finished ones), then write the report files."""
    from peftkit.eval.scoring import evaluate
    from peftkit.models import load_model
    from peftkit.runs.run import SUMMARY, train_run
    from peftkit.train.checkpoint import list_checkpoints

    runs = cfg.run_configs()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base.json"
    if not base_file.is_file():
        model, tok = load_model(cfg.model)
        rows = []
        for k in cfg.eval.shots:
            log(f"base model, {k}-shot ...")
            res = evaluate(model, tok, cfg.data.train, limit=cfg.eval.limit, shots=k, log=log, per_example=True,
                           **_test_args(cfg))
            rows.append({"label": f"{cfg.model} {k}-shot", "kind": "in-context", "shots": k, "metric": _metric(res), **res})
        base = {"rows": rows, "perplexity": _forgetting(model, tok, cfg.eval), "latency_ms": _latency(model, tok, cfg)}
        atomic_write_text(base_file, json.dumps(base, indent=2))
    base = json.loads(base_file.read_text())
    for label, run_cfg in runs:
        run_dir = Path(run_cfg.output_dir)
        if not (run_dir / SUMMARY).is_file():
            log(f"== {label}: training")
            train_run(run_cfg, resume=bool(list_checkpoints(run_dir)), log=log)
        if not (run_dir / "eval.json").is_file():
            log(f"== {label}: scoring")
            atomic_write_text(run_dir / "eval.json", json.dumps(_score_run(run_cfg, cfg, evaluate, log), indent=2))
    report = build_report(cfg, runs, base)
    write_report(out, report)
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return report


def _metric(res: dict[str, Any]) -> tuple[str, float]:
    name = "accuracy" if "accuracy" in res else "rougeL"
    return name, res[name]


def _test_args(cfg: CompareConfig) -> dict[str, Any]:
    """Where every row is scored: ``data.test``, or the rows each run held out of ``data.train`` (never its
    training rows: :func:`peftkit.data.load.load_splits`), rendered with the runs' template."""
    return {"test": cfg.data.test, "template": cfg.data.template}


def _score_run(run_cfg: RunConfig, cfg: CompareConfig, evaluate, log=print) -> dict[str, Any]:
    from peftkit.core.inject import merge
    from peftkit.eval.scoring import load_model_with_adapter

    summary = json.loads((Path(run_cfg.output_dir) / "run_summary.json").read_text())
    adapter = Path(summary["adapter"])
    if summary.get("output_kind") == "model":  # full fine-tuning wrote a whole model folder
        model, tok = load_model_with_adapter(str(adapter))
    else:
        model, tok = load_model_with_adapter(run_cfg.model, str(adapter))
    res = evaluate(model, tok, cfg.data.train, limit=cfg.eval.limit, log=log, per_example=True, **_test_args(cfg))
    scored = {"metric": _metric(res), **res, "perplexity": _forgetting(model, tok, cfg.eval),
              "latency_ms": _latency(model, tok, cfg), "latency_merged_ms": None,
              "adapter_bytes": sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())}
    try:
        merge(model)
    except (TypeError, ValueError):  # methods that cannot fold into the weights
        return scored
    scored["latency_merged_ms"] = _latency(model, tok, cfg)
    return scored


def _forgetting(model: nn.Module, tok: Any, settings: EvalSettings) -> float | None:
    if not settings.forgetting_tokens:
        return None
    from peftkit.data.builtin import general_text_path
    from peftkit.eval.scoring import perplexity

    return perplexity(model, tok, str(general_text_path()), window=256, stride=256,
                      max_tokens=settings.forgetting_tokens)["perplexity"]


@torch.no_grad()
def _latency(model: nn.Module, tok: Any, cfg: CompareConfig, repeats: int = 3) -> float:
    """Median forward time (ms) of a batch of test prompts."""
    from peftkit.data.collate import pad_batch
    from peftkit.data.load import load_splits
    from peftkit.data.template import Template
    from peftkit.train.precision import model_device

    splits = load_splits(cfg.data.train, test=cfg.data.test, seed=0)
    tmpl = Template.create(tok, cfg.data.template, splits.format)
    rows = (splits.test or splits.train)[: cfg.eval.latency_batch]
    batch = pad_batch([{"input_ids": tmpl.prompt_ids(r)} for r in rows], tok.pad_token_id or 0)
    device = model_device(model)
    model.eval()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])  # the first call warms up


def build_report(cfg: CompareConfig, runs: list[tuple[str, RunConfig]], base: dict[str, Any]) -> dict[str, Any]:
    """The table rows (base baselines first), from the files each run left."""
    rows = []
    for b in base["rows"]:
        rows.append({"label": b["label"], "kind": "in-context", "metric": b["metric"][0], "value": b["metric"][1],
                     "trainable_params": 0, "trainable_percent": 0.0, "adapter_bytes": 0, "peak_memory_mb": None,
                     "predicted_memory_mb": None,
                     "train_time_s": None, "tokens_per_s": None, "latency_ms": base["latency_ms"],
                     "latency_merged_ms": None, "perplexity": base["perplexity"], "perplexity_change": 0.0,
                     "n": b.get("n"), "per_example": b.get("per_example")})
    from peftkit.train.tracking import read_metrics

    for label, run_cfg in runs:
        d = Path(run_cfg.output_dir)
        summary = json.loads((d / "run_summary.json").read_text())
        ev = json.loads((d / "eval.json").read_text())
        metrics = read_metrics(d / "metrics.jsonl")
        tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        ppl = ev.get("perplexity")
        rows.append({
            "label": label, "kind": "fine-tuned", "method": run_cfg.method_config().method_name,
            "metric": ev["metric"][0], "value": ev["metric"][1],
            "trainable_params": summary["trainable_params"], "trainable_percent": summary["trainable_percent"],
            "adapter_bytes": ev["adapter_bytes"], "peak_memory_mb": summary["peak_memory_mb"],
            "predicted_memory_mb": summary.get("predicted_memory_mb"),
            "train_time_s": summary["wall_time_s"], "tokens_per_s": statistics.median(tps) if tps else None,
            "latency_ms": ev["latency_ms"], "latency_merged_ms": ev["latency_merged_ms"],
            "perplexity": ppl,
            "perplexity_change": (ppl - base["perplexity"]) if ppl is not None and base["perplexity"] else None,
            "loss_curve": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
            "n": ev.get("n"), "per_example": ev.get("per_example"),
        })
    add_uncertainty(rows)
    return {"model": cfg.model, "data": cfg.data.train, "test_examples": cfg.eval.limit,
            "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "rows": rows,
            "recommendation": recommendation(rows)}


LEVEL = 0.95  # of every interval; a difference from the best is called one below p = 1 - LEVEL


def add_uncertainty(rows: list[dict[str, Any]]) -> None:
    """Give each row ``interval`` (95%: exact binomial for accuracy, bootstrap over test examples for ROUGE-L) and,
    against the best-scoring row on the same test examples, ``p_vs_best`` (McNemar's exact test for accuracy, the
    sign-flip test for ROUGE-L) and ``vs_best`` in words; the per-example scores are used, then dropped."""
    from peftkit.eval.stats import binomial_interval, bootstrap_interval, mcnemar_test, paired_permutation_test

    for row in rows:
        scores, n = row.get("per_example"), row.get("n")
        if row["metric"] == "accuracy" and n:
            k = round(sum(scores)) if scores else round(row["value"] * n)  # an older eval.json: from the mean
            row["interval"] = list(binomial_interval(k, n, LEVEL))
        elif scores and len(scores) > 1:
            row["interval"] = list(bootstrap_interval(scores, LEVEL))
        else:
            row["interval"] = None
    best = max(rows, key=lambda r: r["value"], default=None)
    for row in rows:
        a, b = row.get("per_example"), best.get("per_example") if best else None
        if row is best:
            row["p_vs_best"], row["vs_best"] = None, "best"
        elif not a or not b or len(a) != len(b):
            row["p_vs_best"], row["vs_best"] = None, "-"
        else:
            p = mcnemar_test([x > 0.5 for x in a], [x > 0.5 for x in b]) if row["metric"] == "accuracy" \
                else paired_permutation_test(a, b)
            row["p_vs_best"] = p
            row["vs_best"] = f"{'worse' if p < 1 - LEVEL else 'not distinguishable'} (p={p:.2g})"
    for row in rows:
        row.pop("per_example", None)


#: the costs a recommendation weighs: row key, words, unit formatter
COSTS = (("peak_memory_mb", "peak memory", lambda v: f"{v:,.0f} MB"),
         ("trainable_params", "trainable parameters", lambda v: f"{v:,}"),
         ("train_time_s", "training time", lambda v: f"{v:,.0f} s"),
         ("latency", "inference latency", lambda v: f"{v:,.1f} ms"))


def pareto_front(rows: list[dict[str, Any]], cost: str) -> list[str]:
    """Labels of the fine-tuned rows no other beats on both quality (higher) and ``cost`` (lower)."""
    pts = [(r["label"], r["value"], _cost(r, cost)) for r in rows if r["kind"] == "fine-tuned" and _cost(r, cost) is not None]
    return [a for a, qa, ca in pts
            if not any((qb >= qa and cb <= ca) and (qb > qa or cb < ca) for _, qb, cb in pts)]


def _cost(row: dict[str, Any], cost: str) -> float | None:
    if cost == "latency":  # what serving costs: merged where the method merges
        return row.get("latency_merged_ms") or row.get("latency_ms")
    return row.get(cost)


def recommendation(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences from the table: the best score, which methods the test cannot tell from it, and among those
    the cheapest in each cost; the Pareto fronts (quality vs. each cost)."""
    tuned = [r for r in rows if r["kind"] == "fine-tuned"]
    if not tuned:
        return []
    best = max(rows, key=lambda r: r["value"])
    ties = [r for r in tuned if r is best or r.get("vs_best", "").startswith("not distinguishable")]
    iv = best.get("interval")
    lines = [f"Best {best['metric']}: {best['label']}, {best['value']:.3f}"
             + (f" (95% interval {iv[0]:.3f}-{iv[1]:.3f})" if iv else "") + "."]
    others = [r["label"] for r in ties if r is not best]
    lines.append(f"Not distinguishable from it on these test examples: {', '.join(others)}." if others else
                 "Every other method scores lower than the best by more than chance explains (p < 0.05).")
    if best["kind"] != "fine-tuned":
        lines.append(f"The best row is the untouched model ({best['label']}): fine-tuning did not beat it here.")
    for key, words, fmt in COSTS:
        priced = [r for r in ties if _cost(r, key) is not None]
        if len(priced) > 1:
            cheap = min(priced, key=lambda r: _cost(r, key))
            lines.append(f"Among those, the least {words}: {cheap['label']} ({fmt(_cost(cheap, key))}).")
        front = pareto_front(rows, key)
        if front:
            lines.append(f"Pareto front, {best['metric']} vs. {words}: {', '.join(front)}.")
    return lines


COLUMNS = [
    ("label", "method"), ("value", "test {metric}"), ("interval", "95% interval"), ("vs_best", "vs. the best"), ("trainable_params", "trainable params"),
    ("trainable_percent", "% of model"), ("adapter_bytes", "adapter size"), ("peak_memory_mb", "peak memory (MB)"),
    ("predicted_memory_mb", "predicted memory (MB)"),
    ("train_time_s", "train time (s)"), ("tokens_per_s", "tokens/s"), ("latency_ms", "latency unmerged (ms)"),
    ("latency_merged_ms", "latency merged (ms)"), ("perplexity_change", "general-text ppl change"),
]


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "interval":
        return f"{v[0]:.3f}-{v[1]:.3f}"
    if key == "adapter_bytes":
        return f"{v / 1024:,.0f} KiB" if v else "-"
    if key == "trainable_params":
        return f"{v:,}"
    if key == "trainable_percent":
        return f"{v:.3f}"
    if key == "value":
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:+.2f}" if key == "perplexity_change" else f"{v:,.1f}"
    return str(v)


def markdown_table(report: dict[str, Any]) -> str:
    metric = report["rows"][0]["metric"] if report["rows"] else "metric"
    head = [title.format(metric=metric) for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json, report.md, three PNG plots and a self-contained report.html."""
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    plots = _plots(out, report)
    advice = "".join(f"- {line}\n" for line in report.get("recommendation") or [])
    md = (f"# Method comparison: {report['model']} on {report['data']}\n\n"
          f"{report['steps']} steps x batch {report['batch_size']} per method; {report['test_examples']} test examples.\n\n"
          + markdown_table(report) + "\n\n" + (f"## Recommendation\n\n{advice}\n" if advice else "")
          + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _html(report, plots))


def _plots(out: Path, report: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [r for r in report["rows"] if r["kind"] == "fine-tuned"]
    baselines = [r for r in report["rows"] if r["kind"] == "in-context"]
    metric = report["rows"][0]["metric"] if report["rows"] else "metric"
    paths = []
    for key, xlabel, name, logx in (("trainable_params", "trainable parameters", "quality_vs_params.png", True),
                                    ("peak_memory_mb", "peak memory (MB)", "quality_vs_memory.png", False)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in tuned:
            if r.get(key):
                ax.scatter(r[key], r["value"])
                ax.annotate(r["label"], (r[key], r["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for b in baselines:
            ax.axhline(b["value"], linestyle="--", linewidth=1, color="gray")
            ax.annotate(b["label"], (ax.get_xlim()[0], b["value"]), fontsize=7, color="gray")
        if logx and any(r.get(key) for r in tuned):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in tuned:
        if r.get("loss_curve"):
            ax.plot(*zip(*r["loss_curve"]), label=r["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
    return paths + [out / "loss_curves.png"]


def _html(report: dict[str, Any], plots: list[Path]) -> str:
    import base64
    import html

    metric = report["rows"][0]["metric"] if report["rows"] else "metric"
    head = "".join(f"<th>{html.escape(t.format(metric=metric))}</th>" for _, t in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(k, r.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>"
                   for r in report["rows"])
    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in plots)
    advice = "".join(f"<li>{html.escape(line)}</li>" for line in report.get("recommendation") or [])
    imgs = (f"<h2>Recommendation</h2><ul>{advice}</ul>" if advice else "") + imgs
    title = html.escape(f"Method comparison: {report['model']} on {report['data']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}img{max-width:32%;margin:4px}</style></head><body>"
            f"<h1>{title}</h1><p>{report['steps']} steps x batch {report['batch_size']} per method; "
            f"{report['test_examples']} test examples.</p><table><tr>{head}</tr>{body}</table>{imgs}</body></html>\n")
