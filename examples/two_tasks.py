"""Two tasks on one frozen base: a LoRA per task, served together, then merged into one adapter.

    .venv/bin/python examples/two_tasks.py [--out runs/two-tasks] [--steps 60] [--limit 200] [--chat-limit 50]

1. trains a sentiment LoRA (rotten-tomatoes) and a chat LoRA (chatterbot) with the same LoRA settings
   (so that they can be combined), each from the same built-in SmolLM2-135M-Instruct;
2. loads the base once with both adapters as named adapters, checks that one mixed batch (row i with
   adapter i) gives the same greedy tokens as running each adapter alone;
3. combines them into one adapter three ways (``cat``: the exact sum of both deltas; ``linear`` 0.5/0.5;
   ``ties`` density 0.2);
4. scores every adapter (and the base) on both tasks — sentiment accuracy, chat ROUGE-L — and on held-out
   general text (hamlet.txt perplexity: forgetting), writing ``OUT/report.md`` and ``OUT/report.json``.

Finished trainings are reused (delete ``OUT/sentiment`` or ``OUT/chat`` to train again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import peftkit
from peftkit.core.adapter import disable_adapters, set_active
from peftkit.core.files import atomic_write_text
from peftkit.data.builtin import general_text_path
from peftkit.data.template import Template, user_example
from peftkit.eval.generate import generate
from peftkit.eval.scoring import evaluate, perplexity
from peftkit.methods.lora_combine import combine_adapters
from peftkit.models import load_model
from peftkit.runs.config import load_config
from peftkit.runs.run import train_run

LORA = ["method.name=lora", "method.r=8", "method.alpha=16", "method.dropout=0.0",
        "method.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
TASKS = {  # name -> (training data, its learning rate)
    "sentiment": ("rotten-tomatoes", 1e-3),
    "chat": ("chatterbot", 5e-4),
}
COMBINED = {  # name -> (combination, weights, extra arguments)
    "merged-cat": ("cat", [1.0, 1.0], {}),
    "merged-linear-half": ("linear", [0.5, 0.5], {}),
    "merged-ties": ("ties", [1.0, 1.0], {"density": 0.2, "rank": 16}),
}


def train(out: Path, steps: int) -> dict[str, Path]:
    adapters = {}
    for name, (data, lr) in TASKS.items():
        run_dir = out / name
        adapters[name] = run_dir / "adapter"
        if (adapters[name] / "adapter_config.json").is_file():
            print(f"== {name}: reusing {adapters[name]}")
            continue
        print(f"== {name}: training on {data}")
        cfg = load_config(None, [*LORA, f"data.train={data}", "data.max_length=128", "data.max_validation_examples=32",
                                 f"train.max_steps={steps}", "train.batch_size=8", f"train.lr={lr}",
                                 "train.warmup_steps=10", "train.eval_every=0", "train.save_every=0",
                                 f"output_dir={run_dir}", "overwrite=true"])
        train_run(cfg)
    return adapters


def mixed_batch_matches(model: torch.nn.Module, tok, names: list[str]) -> bool:
    """One batch, row i with adapter i, against each adapter alone: same greedy tokens?"""
    template = Template.create(tok, "auto")
    prompts = [user_example("Review: a warm, funny and beautifully acted film.\nIs this review positive or negative?"),
               user_example("What is your favorite book?")]
    together = generate(model, template, prompts, max_new_tokens=16, adapter_names=names)
    alone = []
    for name, prompt in zip(names, prompts):
        set_active(model, name)
        alone += generate(model, template, [prompt], max_new_tokens=16)
    print(f"mixed batch: {together}\nalone:       {alone}")
    return together == alone


def score(model: torch.nn.Module, tok, args: argparse.Namespace) -> dict[str, float]:
    t = time.time()
    sentiment = evaluate(model, tok, "rotten-tomatoes", limit=args.limit)["accuracy"]
    chat = evaluate(model, tok, "chatterbot", limit=args.chat_limit, max_new_tokens=32)["rougeL"]
    ppl = perplexity(model, tok, str(general_text_path()), window=256, stride=256, max_tokens=2048)["perplexity"]
    print(f"   sentiment accuracy {sentiment:.3f}, chat ROUGE-L {chat:.3f}, hamlet perplexity {ppl:.2f} "
          f"({time.time() - t:.0f} s)")
    return {"sentiment_accuracy": sentiment, "chat_rougeL": chat, "hamlet_perplexity": ppl}


def report(rows: dict[str, dict[str, float]], args: argparse.Namespace, mixed_ok: bool) -> str:
    base = rows["base (no adapter)"]
    lines = [
        "| adapter | sentiment accuracy | chat ROUGE-L | hamlet perplexity | forgetting (ppl change) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        change = r["hamlet_perplexity"] - base["hamlet_perplexity"]
        lines.append(f"| {name} | {r['sentiment_accuracy']:.3f} | {r['chat_rougeL']:.3f} | "
                     f"{r['hamlet_perplexity']:.2f} | {change:+.2f} |")
    lines += ["", f"Sentiment: {args.limit} test reviews (label likelihood). Chat: {args.chat_limit} test prompts, "
              "greedy, 32 new tokens, ROUGE-L F1. Forgetting: perplexity on 2048 tokens of hamlet.txt "
              "(held-out general text) minus the base's.",
              f"Mixed batch (row 1 sentiment adapter, row 2 chat adapter) == each adapter alone: {mixed_ok}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/two-tasks")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--limit", type=int, default=200, help="sentiment test examples")
    p.add_argument("--chat-limit", type=int, default=50, help="chat test examples")
    args = p.parse_args()
    out = Path(args.out)
    adapters = train(out, args.steps)

    model, tok = load_model("smollm2-135m")
    for name, path in adapters.items():  # one base, one small adapter per task
        peftkit.load_adapter(model, path, adapter_name=name)
    model.eval()
    mixed_ok = mixed_batch_matches(model, tok, list(adapters))
    for name, (combination, weights, extra) in COMBINED.items():
        combine_adapters(model, list(adapters), weights, combination, name, **extra)
        peftkit.save_adapter(model, out / name, name)

    rows = {}
    print("== base (no adapter)")
    with disable_adapters(model):
        rows["base (no adapter)"] = score(model, tok, args)
    for name in [*adapters, *COMBINED]:
        print(f"== {name}")
        set_active(model, name)
        rows[name] = score(model, tok, args)
    text = report(rows, args, mixed_ok)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.json", json.dumps({"rows": rows, "mixed_batch_equal": mixed_ok,
                                                       "limit": args.limit, "chat_limit": args.chat_limit,
                                                       "steps": args.steps}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
