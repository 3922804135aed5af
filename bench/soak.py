"""Soak: does memory stay flat over hundreds of steps of real, variable-length data? (issue #16)

Each run is the ``peftkit`` console command (its allocator choice included) training one method on one data set
with ``train.log_every=1``, so ``metrics.jsonl`` holds the process's RSS after every step. A run passes when its RSS
grows by at most ``--max-growth`` (5%) from the warm-up step (``--warmup``, 20) to the end, and its peak is within
+-20% of ``peftkit memory``'s prediction (recorded in ``run_summary.json``).

Allocators (``--allocator``, repeatable): ``default`` (what ``peftkit`` picks by itself), ``system`` (glibc),
``jemalloc`` (jemalloc with its own default settings), ``jemalloc:CONF`` (jemalloc with ``MALLOC_CONF=CONF``, e.g.
``jemalloc:dirty_decay_ms:-1,muzzy_decay_ms:-1``, the setting that grew to 18 GB).

Data (``--data``, repeatable): ``rotten-tomatoes``, ``chatterbot`` (built in), ``long-text`` (hamlet.txt cut into
pieces whose lengths spread evenly up to ``--max-length`` tokens), or a file path.

Models: a built-in alias, a folder, or ``small-llama`` (4 layers, width 256, SmolLM2's tokenizer, random weights:
every method family in minutes). ``--generate N`` instead runs N generate/eval calls of varied length in one
process (a long-lived server's pattern) and samples RSS after each.

    .venv/bin/python bench/soak.py --model smollm2-135m --methods lora --data rotten-tomatoes --steps 300 \
        --allocator default --allocator system --allocator jemalloc:dirty_decay_ms:-1,muzzy_decay_ms:-1
    .venv/bin/python bench/soak.py --model small-llama --methods all --data long-text --steps 300
    .venv/bin/python bench/soak.py --model smollm2-135m --generate 1000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = Path(os.environ.get("PEFTKIT_SOAK_DIR", "/tmp/peftkit-soak"))

# one representative per method family (issue #16's list); settings as a user would start
METHODS: dict[str, str] = {
    "lora": "{name: lora, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
    "qlora": "{name: qlora, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
    "dora": "{name: dora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
    "ia3": "{name: ia3}",
    "prompt_tuning": "{name: prompt_tuning, num_virtual_tokens: 20}",
    "prefix_tuning": "{name: prefix_tuning, num_virtual_tokens: 20}",
    "llama_adapter": "{name: llama_adapter}",
    "bottleneck_adapter": "{name: bottleneck_adapter}",
    "full": "{name: full}",
}
LR = {"full": 2e-5, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "llama_adapter": 1e-2}


def allocator_env(name: str) -> dict[str, str | None]:
    """Environment changes for one allocator choice (None: remove the variable)."""
    if name == "default":
        return {"PEFTKIT_ALLOCATOR": None, "MALLOC_CONF": None, "LD_PRELOAD": None}
    if name == "system":
        return {"PEFTKIT_ALLOCATOR": "system", "MALLOC_CONF": None, "LD_PRELOAD": None}
    if name == "jemalloc":  # jemalloc's own defaults: an empty MALLOC_CONF stops peftkit from adding its own
        return {"PEFTKIT_ALLOCATOR": "jemalloc", "MALLOC_CONF": "", "LD_PRELOAD": None}
    if name.startswith("jemalloc:"):
        return {"PEFTKIT_ALLOCATOR": "jemalloc", "MALLOC_CONF": name.split(":", 1)[1], "LD_PRELOAD": None}
    raise SystemExit(f"--allocator: unknown {name!r} (default, system, jemalloc, jemalloc:CONF)")


def small_llama() -> Path:
    """A 4-layer, 256-wide random Llama with SmolLM2's tokenizer, saved once under the work folder."""
    return random_llama(WORK / "small-llama", hidden=256, intermediate=688, layers=4, positions=2048)


def random_llama(folder: Path, hidden: int, intermediate: int, layers: int, positions: int) -> Path:
    """A random Llama of these sizes with SmolLM2's tokenizer, saved to ``folder`` (kept if already there)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.models.builtin import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=positions, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def long_text(max_length: int, n: int = 1200) -> Path:
    """Prompt/completion pieces of hamlet.txt, total lengths spread evenly from a few words to ~max_length tokens."""
    path = WORK / f"long-text-{max_length}.jsonl"
    if path.is_file():
        return path
    from peftkit.data.builtin import general_text_path

    words = general_text_path().read_text(encoding="utf-8").split()
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            total = rng.randint(8, int(max_length * 0.8))  # ~1.3 tokens a word: up to max_length tokens
            cut = rng.randint(2, max(3, total // 3))
            s = rng.randint(0, len(words) - total - 1)
            f.write(json.dumps({"prompt": " ".join(words[s:s + cut]), "completion": " " + " ".join(words[s + cut:s + total])}) + "\n")
    return path


def resolve(model: str, data: str, max_length: int) -> tuple[str, str]:
    m = str(small_llama()) if model == "small-llama" else model
    d = str(long_text(max_length)) if data == "long-text" else data
    return m, d


def run_one(model: str, method: str, data: str, allocator: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run through the console command; the RSS of every step from its metrics."""
    m, d = resolve(model, data, args.max_length)
    out = WORK / "runs" / f"{Path(model).name}-{method}-{Path(data).stem}-{allocator.replace(':', '_').replace(',', '_')}"
    overrides = [f"model={m}", f"method={METHODS[method]}", f"data.train={d}", f"data.max_length={args.max_length}",
                 f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={LR.get(method, 3e-4)}",
                 "train.log_every=1", "train.save_every=100", "train.eval_every=100", "data.max_validation_examples=32",
                 f"output_dir={out}", "overwrite=true"]
    env = dict(os.environ, PEFTKIT_TENSORBOARD="0", OMP_NUM_THREADS=str(args.threads))
    for k, v in allocator_env(allocator).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env.pop("_PEFTKIT_ALLOCATOR_SET", None)
    t0, cpu0 = time.perf_counter(), _children_cpu()
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "peftkit"), "train", *overrides], env=env, capture_output=True,
                       text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        return {"method": method, "data": data, "allocator": allocator, "error": (r.stderr or r.stdout)[-400:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rss = [(row["step"], row["rss_mb"]) for row in rows if "rss_mb" in row]
    times = [row["time"] for row in rows if "rss_mb" in row]
    summary = json.loads((out / "run_summary.json").read_text())
    warm = next(v for s, v in rss if s >= args.warmup)
    end = rss[-1][1]
    growth = 100 * (end - warm) / warm
    peak, predicted = summary["peak_memory_mb"], summary["predicted_memory_mb"]
    steps_s = [b - a for a, b in zip(times, times[1:])]
    half = len(steps_s) // 2
    return {
        "model": model, "method": method, "data": data, "allocator": allocator, "steps": args.steps,
        "rss_warmup_mb": round(warm, 1), "rss_end_mb": round(end, 1), "rss_max_mb": round(max(v for _, v in rss), 1),
        "growth_percent": round(growth, 1), "peak_mb": peak, "predicted_mb": predicted,
        "peak_vs_predicted": None if not predicted else round(peak / predicted, 3),
        "step_s_first_half": round(sorted(steps_s[:half])[half // 2], 3) if half else None,
        "step_s_second_half": round(sorted(steps_s[half:])[len(steps_s[half:]) // 2], 3) if half else None,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "round": args.round, "rss": rss,
        "pass_growth": growth <= args.max_growth,
        "pass_prediction": None if not predicted else abs(peak - predicted) / predicted <= 0.20,
    }


def _children_cpu() -> float:
    """CPU seconds (user + system) of finished child processes: a run's cost that other load does not inflate much."""
    import resource

    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def generate_soak(model: str, calls: int, allocator: str, args: argparse.Namespace) -> dict[str, Any]:
    """N generate / eval calls of varied length in one fresh process; RSS after each call."""
    m, _ = resolve(model, "rotten-tomatoes", args.max_length)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for k, v in allocator_env(allocator).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    code = f"""
import json, random
from peftkit.allocator import reexec_under_chosen_allocator
reexec_under_chosen_allocator()
import torch
from peftkit.models import load_model
from peftkit.data.template import Template, user_example
from peftkit.eval.generate import generate
from peftkit.eval.classify import classify
from peftkit.train.tracking import current_memory_mb
model, tok = load_model({m!r})
tmpl = Template.create(tok)
words = "the a film story cast plot scene music long short great dull funny sad actor director".split()
rng = random.Random(0)
rss = []
for i in range({calls}):
    n = rng.randint(2, 60)
    prompt = " ".join(rng.choice(words) for _ in range(n))
    if i % 2:
        generate(model, tmpl, [user_example(prompt)] * rng.randint(1, 4), max_new_tokens=rng.randint(1, 16))
    else:
        classify(model, tmpl, [{{"instruction": "Sentiment?", "input": prompt, "output": "positive"}}],
                 ["positive", "negative"], "output", 8)
    rss.append(round(current_memory_mb(), 1))
print("RESULT " + json.dumps(rss))
"""
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"generate": calls, "allocator": allocator, "error": r.stderr[-400:]}
    rss = json.loads(line[7:])
    warm = rss[min(len(rss) - 1, max(1, calls // 20))]
    growth = 100 * (rss[-1] - warm) / warm
    return {"model": model, "generate": calls, "allocator": allocator, "rss_warmup_mb": warm, "rss_end_mb": rss[-1],
            "rss_max_mb": max(rss), "growth_percent": round(growth, 1), "pass_growth": growth <= args.max_growth,
            "rss": list(enumerate(rss, 1))}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if "rss" in r:
            label = f"{r.get('method', 'generate')} / {Path(str(r.get('data', ''))).stem} / {r['allocator']}"
            ax.plot([s for s, _ in r["rss"]], [v for _, v in r["rss"]], label=label, lw=1)
    ax.set_xlabel("step (or call)")
    ax.set_ylabel("RSS (MB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    head = ("| method | data | allocator | RSS after warm-up | RSS at end | growth | max RSS | peak / predicted | "
            "s/step (1st half, 2nd half) | CPU s (run) | pass |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r.get('method', 'generate')} | {r.get('data', '')} | {r['allocator']} | error: "
                        f"{r['error'].strip().splitlines()[-1][:120]} ||||||||")
            continue
        ok = r["pass_growth"] and r.get("pass_prediction") in (True, None)
        pred = f"{r['peak_mb']:,.0f} / {r['predicted_mb']:,.0f}" if r.get("predicted_mb") else "-"
        speed = (f"{r['step_s_first_half']}, {r['step_s_second_half']}" if r.get("step_s_first_half") else "-")
        rows.append(f"| {r.get('method', 'generate x' + str(r.get('generate')))} | {Path(str(r.get('data', '-'))).stem} | "
                    f"{r['allocator']} | {r['rss_warmup_mb']:,.0f} | {r['rss_end_mb']:,.0f} | {r['growth_percent']:+.1f}% | "
                    f"{r['rss_max_mb']:,.0f} | {pred} | {speed} | {r.get('cpu_s', '-')} | {'yes' if ok else 'NO'} |")
    return head + "\n" + "\n".join(rows)


def ratios(results: list[dict[str, Any]]) -> str:
    """Per round, each allocator's run CPU time and median step time over the first allocator's (same method, data)."""
    lines, first = [], {}
    for r in results:
        if "cpu_s" not in r:
            continue
        key = (r["method"], r["data"], r["round"])
        if key not in first:
            first[key] = r
            continue
        f = first[key]
        lines.append(f"- {r['method']} / {Path(str(r['data'])).stem}, round {r['round']}: {r['allocator']} vs "
                     f"{f['allocator']}: CPU {r['cpu_s'] / f['cpu_s']:.3f}x, median step "
                     f"{r['step_s_second_half'] / f['step_s_second_half']:.3f}x, peak {r['peak_mb'] / f['peak_mb']:.3f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="lora", help="comma-separated, or 'all' (" + ", ".join(METHODS) + ")")
    p.add_argument("--data", action="append", help="rotten-tomatoes, chatterbot, long-text or a file (repeatable)")
    p.add_argument("--allocator", action="append", help="default, system, jemalloc, jemalloc:CONF (repeatable)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--max-growth", type=float, default=5.0, help="pass: RSS growth from warm-up to end, percent")
    p.add_argument("--generate", type=int, default=0, help="instead: N generate/eval calls in one process")
    p.add_argument("--rounds", type=int, default=1, help="repeat the allocators in turn (A B A B): ratios per round")
    p.add_argument("--name", default="soak", help="results go to bench/results/NAME.{json,md,png}")
    args = p.parse_args()
    allocators = args.allocator or ["default"]
    results: list[dict[str, Any]] = []
    command = "python bench/soak.py " + " ".join(sys.argv[1:])

    def record(result: dict[str, Any]) -> None:  # written after every run: a long soak stopped early keeps its part
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "rss"}), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
        plot(results, RESULTS / f"{args.name}.png")
        (RESULTS / f"{args.name}.md").write_text(f"`{command}`\n\n{table(results)}\n\n{ratios(results)}\n\n"
                                                f"![RSS over steps]({args.name}.png)\n")

    if args.generate:
        for a in allocators:
            record(generate_soak(args.model, args.generate, a, args))
    else:
        methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
        for data in args.data or ["rotten-tomatoes"]:
            for method in methods:
                for args.round in range(1, args.rounds + 1):
                    for a in allocators:  # allocators side by side for each method, alternating
                        record(run_one(args.model, method, data, a, args))
    print(table(results))
    print(ratios(results))


if __name__ == "__main__":
    main()
