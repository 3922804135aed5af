"""The demo: LoRA on the built-in SmolLM2-135M-Instruct with rotten-tomatoes, on CPU in a few minutes.

Prints held-out test accuracy before and after fine-tuning, and a sample generation.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from peftkit.core.files import atomic_write_text
from peftkit.core.io import load_adapter
from peftkit.data.template import Template
from peftkit.eval.generate import generate
from peftkit.eval.scoring import evaluate_classification
from peftkit.runs.config import RunConfig, load_config
from peftkit.runs.run import train_run

DEMO_OVERRIDES = [
    "model=smollm2-135m",
    "method={name: lora, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
    "data.train=rotten-tomatoes",
    "data.max_length=128",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.warmup_steps=10",
    "train.eval_every=50",
    "train.save_every=50",
    "train.log_every=10",
    "data.max_validation_examples=64",
    "overwrite=true",
]


def demo_config(output_dir: str, steps: int) -> RunConfig:
    return load_config(None, [*DEMO_OVERRIDES, f"output_dir={output_dir}", f"train.max_steps={steps}"])


def demo(output_dir: str = "runs/demo", steps: int = 60, eval_examples: int = 200, log=print) -> dict[str, Any]:
    """Train the demo and report accuracy before/after on held-out test reviews."""
    from peftkit.models import load_model

    cfg = demo_config(output_dir, steps)
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model)
    log(f"scoring {eval_examples} held-out test reviews with the base model ...")
    before = evaluate_classification(model, tok, "rotten-tomatoes", "test", eval_examples)
    log(f"accuracy before fine-tuning: {before['accuracy']:.3f}")
    del model  # training loads its own copy: one model in memory at a time (the run's peak is the training's)
    gc.collect()
    summary = train_run(cfg, log=log)
    model, tok = load_model(cfg.model)  # the cached safetensors folder: well under a second
    load_adapter(model, summary["adapter"])
    after = evaluate_classification(model, tok, "rotten-tomatoes", "test", eval_examples)
    template = Template.create(tok)
    review = "A gorgeous, heartfelt film with a terrific cast; I loved every minute of it."
    from peftkit.data.builtin import load_builtin

    instruction = load_builtin("rotten-tomatoes")["test"][0]["instruction"]
    sample = generate(model, template, [{"instruction": instruction, "input": review, "output": ""}], max_new_tokens=8)[0]
    result = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "eval_examples": after["n"],
        "steps": summary["steps"],
        "trainable_params": summary["trainable_params"],
        "train_wall_time_s": summary["wall_time_s"],
        "total_wall_time_s": round(time.perf_counter() - t0, 1),
        "sample_review": review,
        "sample_generation": sample,
    }
    atomic_write_text(Path(output_dir) / "demo_results.json", json.dumps(result, indent=2) + "\n")
    log(f"held-out test accuracy ({after['n']} reviews): before {before['accuracy']:.3f} -> after {after['accuracy']:.3f}")
    log(f"sample: {review!r} -> {sample!r}")
    return result
