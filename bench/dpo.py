"""DPO with LoRA: peftkit (``peftkit train``, ``train.objective=dpo``) vs TRL's DPOTrainer with PEFT (issue #20).

Both stacks train the same LoRA (r 8, alpha 16, q/k/v/o + MLP, no dropout) on SmolLM2-135M with DPO (beta 0.1) over
the same pairs: the built-in ``chatterbot-preference`` rows in TRL's conversational form (``prompt`` / ``chosen`` /
``rejected`` message lists), each stack rendering them with the model's chat template. Same batch (pairs per step),
learning rate, steps, max length, fp32, no checkpoints, no evaluation. Each stack's reference is the base with the
adapter switched off (no second model copy in either).

Each run is its own process (peak RSS = VmHWM; ``bench/_common.py``); the runs alternate (peftkit, TRL, peftkit,
TRL, ...). Time per pair is measured over the steps after the first ``--warmup`` (both stacks record a time stamp
per step), so loading, tokenization and the first allocations are not in it.

    .venv/bin/python bench/dpo.py                        # 2 rounds x 40 steps x 4 pairs (~15 min on 2 cores)
    .venv/bin/python bench/dpo.py --quick                # a tiny random Llama, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine, run_worker, worker_main  # noqa: E402

SCRIPT = Path(__file__).resolve()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- the data both stacks read ------------------------------------------------------------------------------------
def write_pairs(n: int, out: Path) -> Path:
    """The first ``n`` training pairs of ``chatterbot-preference`` in TRL's conversational form (each stack renders
    them with the model's chat template)."""
    from peftkit.data.builtin import load_builtin

    lines = [json.dumps({"prompt": [{"role": "user", "content": row["prompt"]}],
                         "chosen": [{"role": "assistant", "content": row["chosen"]}],
                         "rejected": [{"role": "assistant", "content": row["rejected"]}]})
             for row in load_builtin("chatterbot-preference")["train"][:n]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# -- workers --------------------------------------------------------------------------------------------------------
def run_peftkit(job: dict[str, Any]) -> dict[str, Any]:
    from peftkit.runs.config import load_config
    from peftkit.runs.run import train_run

    out = Path(job["dir"]) / f"peftkit-{job['round']}"
    overrides = [f"model={job['model']}", "method.name=lora", "method.r=8", "method.alpha=16",
                 f"method.target_modules={json.dumps(TARGETS)}", f"data.train={job['data']}",
                 f"data.max_length={job['max_length']}", "train.objective=dpo", "train.beta=0.1",
                 f"train.max_steps={job['steps']}", f"train.batch_size={job['batch']}", f"train.lr={job['lr']}",
                 "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
                 f"output_dir={out}", "overwrite=true"]
    train_run(load_config(None, overrides))
    stamps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"]: r["time"] for r in stamps if "loss" in r and "time" in r}
    losses = [r["loss"] for r in stamps if "loss" in r]
    return _timing(steps, job) | {"first_loss": losses[0], "last_loss": losses[-1]}


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftkit.models import resolve_model

    folder = str(resolve_model(job["model"]))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=job["data"], split="train")
    steps: dict[int, float] = {}
    losses: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps[state.global_step] = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = DPOConfig(output_dir=str(Path(job["dir"]) / f"trl-{job['round']}"), per_device_train_batch_size=job["batch"],
                     max_steps=job["steps"], learning_rate=job["lr"], beta=0.1, max_length=job["max_length"],
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, lr_scheduler_type="constant",
                     warmup_steps=0, dataloader_pin_memory=False, seed=0,
                     # TRL's defaults turn on gradient checkpointing and bf16 autocast: the same settings as peftkit's
                     # run (fp32, every activation kept) need them off (bf16 on a CPU without AVX512-BF16 is ~100x slower)
                     gradient_checkpointing=False, bf16=False, fp16=False)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora, callbacks=[Stamp()])
    trainer.train()
    return _timing(steps, job) | {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def _timing(steps: dict[int, float], job: dict[str, Any]) -> dict[str, Any]:
    first, last = job["warmup"], max(steps)
    seconds = steps[last] - steps[first]
    return {"steps": last, "s_per_pair": round(seconds / ((last - first) * job["batch"]), 4)}


def work(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return run_peftkit(job) if job["stack"] == "peftkit" else run_trl(job)


# -- the comparison -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama (--model FOLDER), 6 steps, 1 round")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.json"))
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, work)
        return 0
    if args.quick:
        args.steps, args.rounds, args.batch = 6, 1, 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data = write_pairs(args.steps * args.batch * 2, workdir / "pairs.jsonl")
    rows = []
    for r in range(args.rounds):
        for stack in ("peftkit", "trl"):
            job = {"stack": stack, "model": args.model, "data": str(data), "steps": args.steps, "batch": args.batch,
                   "lr": 5e-5, "max_length": args.max_length, "warmup": min(5, args.steps - 2), "round": r,
                   "dir": str(workdir)}
            rows.append(run_worker(SCRIPT, job))
    report = _report(rows, args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def med(stack: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["job"]["stack"] == stack)

    summary = {s: {"peak_rss_mb": med(s, "peak_rss_mb"), "peak_delta_mb": med(s, "peak_delta_mb"),
                   "s_per_pair": med(s, "s_per_pair")} for s in ("peftkit", "trl")}
    return {"command": "python bench/dpo.py " + " ".join(sys.argv[1:]), "machine": machine(), "model": args.model,
            "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "rounds": args.rounds,
            "summary": summary, "peak_ratio_trl_over_peftkit": summary["trl"]["peak_rss_mb"] / summary["peftkit"]["peak_rss_mb"],
            "time_ratio_trl_over_peftkit": summary["trl"]["s_per_pair"] / summary["peftkit"]["s_per_pair"], "rows": rows}


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"# DPO + LoRA: peftkit vs TRL DPOTrainer ({report['model']}, {report['steps']} steps x {report['batch']} "
             f"pairs, max_length {report['max_length']}, {report['rounds']} rounds, medians)", "",
             f"`{report['command']}`", "",
             "| stack | peak RSS (MB) | peak above the imports (MB) | s per pair |", "|---|---|---|---|"]
    for stack in ("peftkit", "trl"):
        lines.append(f"| {stack} | {s[stack]['peak_rss_mb']:,.0f} | {s[stack]['peak_delta_mb']:,.0f} | "
                     f"{s[stack]['s_per_pair']:.3f} |")
    lines += ["", f"TRL / peftkit: peak {report['peak_ratio_trl_over_peftkit']:.2f}x, time per pair "
                  f"{report['time_ratio_trl_over_peftkit']:.2f}x", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
