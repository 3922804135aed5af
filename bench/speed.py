"""Speed and memory, peftkit vs transformers + PEFT, side by side in one run (issue #9).

Parts (``--parts``, default all):

  real     LoRA training on real variable-length data (rotten-tomatoes, chatterbot) on smollm2-135m:
           wall time and real (non-padding) tokens/s for a fixed number of examples. peftkit with its
           defaults (peftkit's Trainer) vs transformers' Trainer + peft ``get_peft_model`` with the Trainer's
           usual settings (DataCollatorForSeq2Seq padding to the longest in the batch, shuffled), same
           examples, LoRA r/alpha/targets, batch size, lr, fp32. ``--levers`` adds peftkit runs with one
           lever switched off each.
  step     a fixed-shape training step (forward + backward + clip + AdamW) on a GPT-2-shaped (GPT-2 small)
           and a Llama-shaped (SmolLM2-135M config) model with random weights: peftkit LoRA (fused head + loss,
           and the plain loss), PEFT LoRA and full fine-tuning; achieved FLOP/s of each against the matmul peak,
           both by wall time and by this process's CPU time (what a shared CPU's other work does not inflate;
           with several torch threads, CPU seconds / threads). The peak is measured the same two ways, in the
           same process, before every timed round (median over rounds): peak and steps see the same load.
  gen      greedy generation latency (N new tokens) on smollm2-135m: bare base, adapter unmerged, merged.
  matmul   the machine's matmul peak: a large fp32 matmul, and bf16 (measured once; bf16 training is
           skipped on CPUs without native bf16, where it is ~100x slower than fp32).

Each configuration runs in its own process (its peak RSS is its own) and the configurations of one
comparison alternate (A B A B ...); the table shows medians and ratios. Every job records the load
average at its start and end and its involuntary context switches (a process waiting for a core: the
load indicator); the fixed-shape steps record them per step. ``--quick`` runs tiny models in-process in
a few seconds (the smoke test).

    .venv/bin/python bench/speed.py --levers --compile --threads 1 --out bench/results   # BENCHMARKS.md's run
    .venv/bin/python bench/speed.py --parts step --steps 6
    .venv/bin/python bench/speed.py --quick                                               # the smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import alternate, machine, median, peak_rss_mb, reset_peak, rss_mb, worker_main  # noqa: E402

SCRIPT = Path(__file__).resolve()
PARTS = ("matmul", "step", "gen", "real")
DATASETS = ("rotten-tomatoes", "chatterbot")
LORA = {"r": 8, "alpha": 16.0}  # peftkit's defaults; PEFT is given the same (and the same targets)
LR = 2e-4
# transformers' Trainer defaults (TrainingArguments; the smoke test checks them): the reference step does what the
# Trainer does, and peftkit's step is given the same (none of these is a peftkit feature)
REFERENCE = {"optim": "adamw_torch_fused", "weight_decay": 0.0, "max_grad_norm": 1.0}
PEAK_N, PEAK_REPEATS = 2048, 4  # the matmul peak before each timed step round: ~1 s at 1 thread

# -- models -------------------------------------------------------------------------------------------

SHAPES = {  # fixed-shape step models: random weights from a config
    "gpt2": {"model_type": "gpt2"},  # GPT-2 small: 12 x 768, vocab 50257 (124M)
    "llama": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
              "max_position_embeddings": 2048, "rope_theta": 100000.0},  # SmolLM2-135M's shape (134.5M)
}
QUICK_SHAPES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 512},
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True,
              "max_position_embeddings": 512},
}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # peftkit's (and PEFT's) defaults per family


def config_model(spec: dict[str, Any]) -> Any:
    """A randomly initialised causal LM (fp32, seeded) from a config spec."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def real_model(quick: bool) -> tuple[Any, Any]:
    """smollm2-135m and its tokenizer; with ``quick`` a tiny random Llama behind the same tokenizer."""
    from transformers import AutoTokenizer

    from peftkit.models import load_model, resolve_model

    if not quick:
        return load_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"), local_files_only=True)
    spec = {**QUICK_SHAPES["llama"], "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return config_model(spec), tok


def attach(model: Any, stack: str, family: str) -> Any:
    """LoRA (r 8, alpha 16, the family's default targets, no dropout) by ``stack``; ``full`` trains everything."""
    import peftkit

    if stack == "peftkit":
        import torch

        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0,
                                                 target_modules=TARGETS[family]))
        return model
    if stack == "full":
        peftkit.inject(model, peftkit.FullConfig())
        return model
    if stack == "peft":
        import peft

        cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS[family],
                              fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, cfg)
    raise ValueError(f"unknown stack {stack!r}")


# -- FLOP counting ------------------------------------------------------------------------------------

def step_flops(model: Any, batch: int, seq: int) -> dict[str, float]:
    """FLOPs of one training step, counted from the model's matmuls (not 6N).

    Per token, every linear-like weight of n elements costs 2n forward and 2n backward for the input
    gradient; only trainable weights cost another 2n for their weight gradient (frozen ones need none).
    The LM head counts like any linear (a tied embedding too); embedding lookups cost nothing. Causal
    attention: QK^T and AV over the lower triangle, 2*S^2*d forward per sequence and layer, twice that backward.
    """
    tokens = batch * seq
    fwd = bwd = 0.0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or not _is_matmul(module):
            continue
        n = weight.numel()
        fwd += 2 * n * tokens
        bwd += 2 * n * tokens + (2 * n * tokens if weight.requires_grad else 0)
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    attn_fwd = 2 * batch * seq * seq * width * layers  # causal: half of 4*S^2*d
    return {"forward": fwd + attn_fwd, "backward": bwd + 2 * attn_fwd, "total": fwd + bwd + 3 * attn_fwd}


def _is_matmul(module: Any) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# -- clocks -------------------------------------------------------------------------------------------

def clocks() -> tuple[float, float, int]:
    """Now: wall seconds, this process's CPU seconds (every thread, user + system) and its involuntary
    context switches so far (times the scheduler took a core from it: the load indicator)."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def measured(fn: Callable[[], Any]) -> tuple[float, float, int]:
    """One call of ``fn``: its wall seconds, CPU seconds (all threads) and involuntary context switches."""
    w0, c0, s0 = clocks()
    fn()
    w1, c1, s1 = clocks()
    return w1 - w0, c1 - c0, s1 - s0


def matmul_peak(n: int, repeats: int, dtype: str = "fp32") -> dict[str, Any]:
    """GFLOP/s of an ``n`` x ``n`` matmul, best of ``repeats`` (after one warm-up), by wall time and by CPU time.

    CPU time counts every thread, so it is divided by the torch thread count: with N threads busy, CPU seconds
    are ~N x wall, and ``gflops_cpu`` is then comparable with ``gflops`` (equal on an idle machine).
    """
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    a @ b
    runs = [measured(lambda: a @ b) for _ in range(repeats)]
    flop, threads = 2 * n**3, torch.get_num_threads()
    return {"n": n, "gflops": flop / min(w for w, _, _ in runs) / 1e9,
            "gflops_cpu": flop / (min(c for _, c, _ in runs) / threads) / 1e9,
            "nivcsw": sum(sw for _, _, sw in runs)}


# -- workers ------------------------------------------------------------------------------------------

def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One job; its result gains ``load``: the load average at its start and end, its wall and CPU seconds,
    its involuntary context switches and the torch thread count."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    load_start, start = os.getloadavg(), clocks()
    result = {"matmul": job_matmul, "step": job_step, "step-memory": job_step_memory, "gen": job_gen,
              "gen-memory": job_gen_memory, "real": job_real}[job["part"]](job)
    end = clocks()
    result["load"] = {"load_average_start": [round(x, 2) for x in load_start],
                      "load_average_end": [round(x, 2) for x in os.getloadavg()],
                      "wall_s": end[0] - start[0], "cpu_s": end[1] - start[1], "nivcsw": end[2] - start[2],
                      "threads": torch.get_num_threads()}
    return result


def job_matmul(job: dict[str, Any]) -> dict[str, Any]:
    """Peak GFLOP/s of square matmuls: the best of ``repeats`` timings at each size in ``sizes``, by wall and
    by CPU time (each the best size for that clock)."""
    by = {n: matmul_peak(n, job["repeats"], job["dtype"]) for n in job["sizes"]}
    n = max(by, key=lambda k: by[k]["gflops"])
    return {"gflops": by[n]["gflops"], "n": n, "gflops_cpu": max(r["gflops_cpu"] for r in by.values()),
            "by_size": {k: r["gflops"] for k, r in by.items()}, "by_size_cpu": {k: r["gflops_cpu"] for k, r in by.items()}}


def build_step(job: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """One configuration's fixed-shape training step (forward, backward, clip, AdamW): ``(model, step, info)``.

    peftkit (and full FT) step as peftkit's Trainer does (``loop.Trainer._step``): ``lm_loss_sum`` divided by
    the label count, the optimizer of ``make_optimizer`` (fused AdamW), the gradient norm clipped over the
    trainable parameters, gradients set to None. ``job["fused_loss"]`` is passed explicitly, so a row means the
    same whichever default ``lm_loss_sum`` has. The PEFT reference steps as transformers' Trainer does: the
    model's own loss (mean over labels), fused AdamW, the same clipping and zeroing. Both get the Trainer's
    defaults (:data:`REFERENCE`) for weight decay and clipping. Left out on both sides alike: the lr scheduler
    and the loss/grad-norm checks (a few scalars per step).
    """
    import torch

    from peftkit.train.config import TrainConfig
    from peftkit.train.loss import lm_loss_sum
    from peftkit.train.optim import make_optimizer
    from peftkit.train.precision import autocast

    shapes = QUICK_SHAPES if job.get("quick") else SHAPES
    model = attach(config_model(shapes[job["shape"]]), job["stack"], job["shape"])
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(model.config.vocab_size, (job["batch"], job["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=LR, weight_decay=REFERENCE["weight_decay"], max_grad_norm=REFERENCE["max_grad_norm"])

    if job["stack"] == "peft":  # the reference: what the Trainer does (loss from labels, its default fused AdamW)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=REFERENCE["weight_decay"], fused=True)

        def loss_fn() -> torch.Tensor:
            return model(**batch, use_cache=False).loss
    else:
        opt = make_optimizer(model, cfg)
        if job.get("optimizer") == "loop":  # lever off: torch's default (for-loop) AdamW update
            opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                                    lr=LR, fused=False, foreach=False)
        if job.get("compile"):
            from peftkit.train.compile import compile_blocks

            compile_blocks(model)
        fused_loss = bool(job["fused_loss"])  # required: never the default of the day

        def loss_fn() -> torch.Tensor:
            with autocast(ids.device, job.get("precision", "fp32")):
                loss_sum, n = lm_loss_sum(model, batch, fused_loss=fused_loss)
            return loss_sum / n

    def step() -> None:
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"trainable": sum(p.numel() for p in params), "flops": step_flops(model, job["batch"], job["seq"]),
            "fused_adamw": bool(opt.defaults.get("fused")), "fused_loss": job.get("fused_loss"),
            "weight_decay": sorted({g["weight_decay"] for g in opt.param_groups}), "max_grad_norm": cfg.max_grad_norm}
    return model, step, info


def job_step(job: dict[str, Any]) -> dict[str, Any]:
    """The configurations of ``job["configs"]`` in one process, their steps interleaved (A B C, B C A, C A B ...:
    each round starts one further on, so no configuration always follows the same one): a slow second on a
    shared CPU then hits all of them, and per-round ratios stay honest. Before each round, the matmul peak is
    measured (``peak_n`` x ``peak_n``, best of ``peak_repeats``): the peak is the median over rounds."""
    import torch

    built = [build_step({**job, **c}) for c in job["configs"]]
    threads = torch.get_num_threads()
    first = [measured(step)[0] for _, step, _ in built]  # one-off work (allocator warm-up, compilation) untimed
    peaks: list[dict[str, Any]] = []
    runs: list[list[tuple[float, float, int]]] = [[] for _ in built]  # per config: (wall, cpu, nivcsw) per round
    for r in range(job["steps"]):
        peaks.append(matmul_peak(job.get("peak_n", PEAK_N), job.get("peak_repeats", PEAK_REPEATS)))
        for i in [(r + k) % len(built) for k in range(len(built))]:
            runs[i].append(measured(built[i][1]))
    peak = {"n": peaks[0]["n"], "gflops": median(p["gflops"] for p in peaks),
            "gflops_cpu": median(p["gflops_cpu"] for p in peaks), "rounds": peaks}
    return {"threads": threads, "peak": peak,
            "configs": [step_stats(rs, f, info, threads, peak) for rs, f, (_, _, info) in zip(runs, first, built)]}


def step_stats(runs: list[tuple[float, float, int]], first: float, info: dict[str, Any], threads: int,
               peak: dict[str, Any]) -> dict[str, Any]:
    """One configuration's step figures from its ``(wall s, CPU s, involuntary switches)`` per round.

    ``gflops_cpu`` divides the FLOPs by CPU seconds / ``threads`` (the matmul peak's ``gflops_cpu`` likewise);
    ``on_cpu`` is CPU seconds / (wall seconds x threads): ~1 on an idle machine, less while other work holds
    the cores (with one thread exactly the share of the step's wall time it ran).
    """
    wall, cpu, switches = ([r[k] for r in runs] for k in range(3))
    flops = info["flops"]["total"]
    gflops, gflops_cpu = flops / median(wall) / 1e9, flops / (median(cpu) / threads) / 1e9
    return {"times": wall, "cpu_times": cpu, "nivcsw": switches, "median_s": median(wall), "median_cpu_s": median(cpu),
            "first_step_s": first, "gflops": gflops, "gflops_cpu": gflops_cpu, "of_peak": gflops / peak["gflops"],
            "of_peak_cpu": gflops_cpu / peak["gflops_cpu"], "nivcsw_per_step": median(switches),
            "on_cpu": median(c / (w * threads) for w, c in zip(wall, cpu)), **info}


def job_step_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one configuration alone (its own process): build, two steps (from the second on, the
    optimizer state and gradients exist while the activations of the next forward are held)."""
    _, step, info = build_step(job)
    step()
    step()
    return {"trainable": info["trainable"]}


def gen_variant(job: dict[str, Any], variant: str, model: Any = None) -> tuple[Any, Any]:
    """smollm2-135m as bare base, with a LoRA adapter (r 8 on q/v, B not zero), or with it merged.

    Given ``model`` (a bare base), it is changed in place: its weights keep their memory in every variant,
    so the variants differ only by what they compute (separately loaded copies differ by where their
    weights landed, which moved latency by several percent here).
    """
    import torch

    import peftkit

    tok = None
    if model is None:
        model, tok = real_model(job.get("quick", False))
    model.eval()
    if variant != "base":
        torch.manual_seed(0)  # the same adapter every time
        peftkit.inject(model, peftkit.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], init="random"))  # B not zero
        if variant == "merged":
            peftkit.merge(model)
    return model, tok


def job_gen(job: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation of exactly ``new_tokens`` tokens (batch 1), the variants interleaved on one model
    (bare base -> adapter merged -> unmerged -> adapter removed, every round)."""
    import time as _time

    import torch

    import peftkit

    model, tok = real_model(job.get("quick", False))
    model.eval()
    prompt = _prompt_ids(tok)
    n = job["new_tokens"]

    @torch.no_grad()
    def generate() -> Any:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == prompt.shape[1] + n
        return out[0, prompt.shape[1]:]

    def into(variant: str) -> None:
        if variant == "base":
            if getattr(model, "peftkit_state", None) is not None:
                peftkit.unload(model)
        elif variant == "merged":
            gen_variant(job, "merged", model)
        else:  # unmerged: follows merged in each round
            peftkit.unmerge(model)

    order = ["base", "merged", "unmerged"]
    times: dict[str, list[float]] = {v: [] for v in order}
    outputs = {}
    for r in range(job["repeats"] + 1):  # round 0 warms up
        for v in order:
            into(v)
            t = _time.perf_counter()
            outputs[v] = generate()
            if r:
                times[v].append(_time.perf_counter() - t)
    same = [bool(torch.equal(outputs[v], outputs["unmerged"])) for v in order]  # merged must generate what unmerged does
    return {"prompt_tokens": int(prompt.shape[1]), "same_tokens_as_unmerged": same,
            "variants": [{"variant": v, "times": times[v], "median_s": median(times[v])} for v in order]}


def job_gen_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one generation variant alone (its own process): build, generate once."""
    import torch

    model, tok = gen_variant(job, job["variant"])
    prompt = _prompt_ids(tok)
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["new_tokens"],
                       min_new_tokens=job["new_tokens"], do_sample=False, pad_token_id=tok.pad_token_id)
    return {}


def _prompt_ids(tok: Any) -> Any:
    from peftkit.data.load import load_splits
    from peftkit.data.template import Template

    splits = load_splits("rotten-tomatoes")
    template = Template.create(tok, "auto", splits.format)
    import torch

    return torch.tensor([template.prompt_ids(splits.test[0])])


def real_examples(tok: Any, dataset: str, n: int) -> list[dict[str, list[int]]]:
    """The first ``n`` training examples (after a seeded shuffle), encoded by peftkit's template with
    response-only labels: both stacks train on exactly these."""
    from peftkit.data.load import load_splits
    from peftkit.data.template import Template
    from peftkit.data.tokenize import encode_all

    splits = load_splits(dataset)
    rows = list(splits.train)
    random.Random(0).shuffle(rows)
    template = Template.create(tok, "auto", splits.format)
    return encode_all(template, rows[:n], 256).examples


def job_real(job: dict[str, Any]) -> dict[str, Any]:
    """Wall time of one pass over ``examples`` real examples, and real tokens/s."""
    model, tok = real_model(job.get("quick", False))
    examples = real_examples(tok, job["dataset"], job["examples"])
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        if job["stack"] == "reference":
            seconds, processed, steps = _train_reference(model, tok, examples, job, Path(tmp))
            computed = processed
        else:
            seconds, processed, computed, steps = _train_peftkit(model, examples, pad_id, job, Path(tmp))
    return {"seconds": seconds, "real_tokens": real_tokens, "processed_tokens": processed, "steps": steps,
            "computed_tokens": computed, "tokens_per_s": real_tokens / seconds,
            "padding_fraction": 1 - real_tokens / max(processed, 1)}


def _train_peftkit(model: Any, examples: list, pad_id: int, job: dict[str, Any], out: Path) -> tuple[float, int, int]:
    """peftkit's Trainer with its defaults; ``job["levers"]`` switches single levers off (or on)."""
    import peftkit.train.loop as loop
    from peftkit.data.collate import batch_order
    from peftkit.runs.config import DataConfig
    from peftkit.train.config import TrainConfig
    from peftkit.train.loss import lm_loss_sum

    levers = job.get("levers", {})
    data = DataConfig()
    packing = levers.get("packing", data.packing)
    group = levers.get("group_by_length", data.group_by_length)
    attach(model, "peftkit", "llama")
    bs = job["batch"]
    lengths = [len(e["input_ids"]) for e in examples]
    batches = batch_order(lengths, bs, 0, 0, group, bs * data.max_length if packing else None)
    processed, computed = _peftkit_tokens(examples, batches, pad_id, packing, levers)
    cfg = TrainConfig(max_steps=len(batches), batch_size=bs, lr=LR, eval_every=0, save_every=0,
                      log_every=len(batches), seed=0, **levers.get("train", {}))
    extra = {}
    if levers.get("loss"):  # keyword arguments of lm_loss_sum, e.g. {"labelled_only": False}
        extra["objective"] = dataclasses.replace(loop.LM_OBJECTIVE, loss_sum=functools.partial(lm_loss_sum, **levers["loss"]))
    batching = loop.Batching(pad_id, packing, group, data.max_length, levers.get("split_padding", True))
    trainer = loop.Trainer(model, examples, [], cfg, batching, loop.Wiring(out, show_progress=False, **extra))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start, processed, computed, len(batches)


def _peftkit_tokens(examples: list, batches: list[list[int]], pad_id: int, packing: bool, levers: dict) -> tuple[int, int]:
    """Tokens fed to the model (padding included) and token positions computed (a shared prefix once per
    sub-batch), as peftkit's Trainer batches them."""
    from peftkit.data.collate import pack_batch, pad_batch, split_padded
    from peftkit.train.shared_prefix import shared_prefix_len

    fed = computed = 0
    for b in batches:
        rows = [examples[i] for i in b]
        if packing:
            n = pack_batch(rows, pad_id)["input_ids"].numel()
            fed, computed = fed + n, computed + n
            continue
        batch = pad_batch(rows, pad_id)
        for sub in split_padded(batch) if levers.get("split_padding", True) else [batch]:
            r, t = sub["input_ids"].shape
            share = shared_prefix_len(sub) if levers.get("loss", {}).get("share_prefix", True) and \
                levers.get("loss", {}).get("labelled_only", True) else 0
            fed += r * t
            computed += r * t - (r - 1) * share
    return fed, computed


def _train_reference(model: Any, tok: Any, examples: list, job: dict[str, Any], out: Path) -> tuple[float, int, int]:
    """transformers' Trainer + peft with the Trainer's usual settings (shuffled, padded to the longest)."""
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS["llama"],
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    processed = [0, 0]

    def collate(features: list[dict]) -> dict:
        batch = collator([dict(f) for f in features])
        processed[0] += int(batch["input_ids"].numel())
        processed[1] += 1
        return batch

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=job["batch"], learning_rate=LR, num_train_epochs=1,
        warmup_steps=10, lr_scheduler_type="cosine", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, processed[0], processed[1]


# -- the parent: which jobs, in which order, and the table --------------------------------------------

def plan(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per comparison: its jobs and how many rounds they alternate (``{"jobs": [...], "rounds": k}``).

    Fixed-shape steps and generation interleave their configurations inside one process (job 0), step by
    step; a process of its own per configuration (the later jobs) then measures each one's peak memory.
    Real-data runs are whole trainings: they alternate process by process, ``--rounds`` times.
    """
    q = {"quick": True} if args.quick else {}
    groups: dict[str, dict[str, Any]] = {}
    if "matmul" in args.parts:
        sizes = [128, 256] if args.quick else [1024, 2048, 3072]
        groups["matmul"] = {"rounds": 1, "jobs": [{"part": "matmul", "dtype": "fp32", "sizes": sizes, "repeats": 5},
                                                  {"part": "matmul", "dtype": "bf16", "sizes": [min(sizes[0], 512)], "repeats": 2}]}
    if "step" in args.parts:
        batch, seq = (2, 32) if args.quick else (args.batch, args.seq)
        peak = {"peak_n": 128 if args.quick else PEAK_N, "peak_repeats": PEAK_REPEATS}
        for shape in ("gpt2", "llama"):
            configs = [dict(c) for c in STEP_CONFIGS]
            if args.levers and shape == "llama":
                configs.append({"stack": "full", "fused_loss": True, "optimizer": "loop", "variant": "for-loop AdamW"})
            if args.compile and shape == "llama":
                configs.append({"stack": "peftkit", "fused_loss": True, "compile": True, "variant": "train.compile"})
            common = {"shape": shape, "batch": batch, "seq": seq, **q}
            jobs = [{"part": "step", **common, "steps": args.steps, **peak, "configs": configs}]
            jobs += [{"part": "step-memory", **common, **c} for c in configs if not c.get("compile")]
            groups[f"step-{shape}"] = {"rounds": 1, "jobs": jobs}
    if "gen" in args.parts:
        common = {"new_tokens": 8 if args.quick else args.new_tokens, **q}
        jobs = [{"part": "gen", **common, "repeats": args.gen_repeats}]
        jobs += [{"part": "gen-memory", **common, "variant": v} for v in ("base", "merged", "unmerged")]
        groups["gen"] = {"rounds": 1, "jobs": jobs}
    if "real" in args.parts:
        n, bs = (8, 4) if args.quick else (args.examples, 8)
        for ds in DATASETS:
            common = {"part": "real", "dataset": ds, "examples": n, "batch": bs, **q}
            groups[f"real-{ds}"] = {"rounds": args.rounds,
                                    "jobs": [{**common, "stack": s} for s in ("peftkit", "reference")]}
        if args.levers:  # one round: each lever off once, next to a run of the defaults
            for ds in DATASETS:
                common = {"part": "real", "dataset": ds, "examples": n, "batch": bs, "stack": "peftkit", **q}
                jobs = [common] + [{**common, "levers": lever, "variant": name} for name, lever in LEVER_OFF.items()]
                groups[f"levers-{ds}"] = {"rounds": 1, "jobs": jobs}
    return groups


# the fixed-shape step's configurations (each shape); peftkit's loss path is always named (fused_loss), so the
# rows mean the same whichever default lm_loss_sum / train.fused_loss has. The report compares with the rows
# whose stack is "peft" and "full" and that have no "variant".
STEP_CONFIGS: list[dict[str, Any]] = [
    {"stack": "peftkit", "fused_loss": True},
    {"stack": "peftkit", "fused_loss": False, "variant": "plain loss"},
    {"stack": "peft"},
    {"stack": "full", "fused_loss": True},
]

# peftkit with one lever changed from its default: shows what each lever is worth on real data
LEVER_OFF: dict[str, dict[str, Any]] = {
    "no shared prefix": {"loss": {"share_prefix": False}},
    "no shared prefix, logits at every position": {"loss": {"labelled_only": False}},
    "no padding split": {"split_padding": False},
    "no length grouping": {"group_by_length": False},
    "packing instead of grouping": {"packing": True},
}


def run_inline(groups: dict[str, dict[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
    """--quick: every job in this process (fast; memory figures are then RSS deltas within one process)."""
    out = {}
    for name, group in groups.items():
        jobs = group["jobs"]
        out[name] = [[] for _ in jobs]
        for _ in range(group["rounds"]):
            for i, job in enumerate(jobs):
                base = rss_mb()
                reset_peak()
                result = run_job(job)
                result["peak_delta_mb"] = round(peak_rss_mb() - base, 1)
                out[name][i].append({"job": job, **result})
    return out


def fused_loss_default() -> dict[str, Any]:
    """Whether peftkit's defaults use the fused head + loss (the real-data rows run the defaults): the default of
    ``lm_loss_sum(fused_loss=...)`` and of ``train.fused_loss`` (None where there is no such field)."""
    import inspect

    from peftkit.train.config import TrainConfig
    from peftkit.train.loss import lm_loss_sum

    param = inspect.signature(lm_loss_sum).parameters.get("fused_loss")
    return {"lm_loss_sum": None if param is None else param.default,
            "train.fused_loss": getattr(TrainConfig(), "fused_loss", None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default: all)")
    p.add_argument("--rounds", type=int, default=2, help="alternation rounds per comparison (A B A B ...)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per fixed-shape job (after 1 warm-up step)")
    p.add_argument("--batch", type=int, default=4, help="fixed-shape batch size")
    p.add_argument("--seq", type=int, default=256, help="fixed-shape sequence length")
    p.add_argument("--examples", type=int, default=48, help="real-data examples per run (one pass, batch 8)")
    p.add_argument("--levers", action="store_true", help="also peftkit with single levers switched off (real data; "
                   "for-loop AdamW in the Llama full FT step)")
    p.add_argument("--compile", action="store_true", help="step: also peftkit LoRA with train.compile (Llama shape)")
    p.add_argument("--new-tokens", type=int, default=32, help="generation: new tokens")
    p.add_argument("--gen-repeats", type=int, default=4, help="generation: timed generations per job")
    p.add_argument("--threads", type=int, help="torch threads in every job (default: torch's choice, one per core); "
                   "on a CPU shared with other work, 1 avoids threads spinning while waiting for each other")
    p.add_argument("--quick", action="store_true", help="tiny models, in-process: a smoke run in seconds")
    p.add_argument("--subprocess", action="store_true", help="with --quick: still one process per job")
    p.add_argument("--out", type=Path, help="write speed.json and speed.md into this folder")
    args = p.parse_args(argv)
    if args.worker:
        import peft  # noqa: F401  imported up front by every worker: "peak MB" is then what the job added
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import peftkit  # noqa: F401
        import peftkit.train.loop  # noqa: F401

        worker_main(args.worker, run_job)
        return 0
    if args.quick:
        args.rounds, args.steps, args.gen_repeats = 1, 2, 1  # two step rounds: the rotation and the peak median run
        import torch

        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and does not crawl on a busy CPU
    info = machine()
    info["peftkit_fused_loss_default"] = fused_loss_default()
    print(f"machine: {json.dumps(info)}", flush=True)
    groups = plan(args)
    if args.quick:
        args.threads = 1
    if args.threads:
        info["torch_threads"] = args.threads
        for group in groups.values():
            for job in group["jobs"]:
                job["threads"] = args.threads
    started = time.perf_counter()
    if args.quick and not args.subprocess:
        results = run_inline(groups)
    else:
        results = {}
        for name, group in groups.items():
            print(f"{name}:", flush=True)
            results[name] = alternate(SCRIPT, group["jobs"], group["rounds"])
    elapsed = time.perf_counter() - started
    info["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    table = report(results, info, " ".join(sys.argv[1:]), elapsed)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.json").write_text(json.dumps({"machine": info, "results": results}, indent=1))
        (args.out / "speed.md").write_text(table)
    return 0


# -- the report ---------------------------------------------------------------------------------------

def report(results: dict[str, list[list[dict[str, Any]]]], info: dict[str, Any], argv: str, elapsed: float) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores ({info['cpu_capability']}), {info['memory_gb']} GB; "
             f"torch {info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
             f"peft {info['peft']}, Python {info['python']}.",
             f"Command: `.venv/bin/python bench/speed.py {argv}`".rstrip() + f" ({elapsed / 60:.1f} min). "
             f"Load average (1/5/15 min) of the shared CPU: {info['load_average']} at the start, "
             f"{info.get('load_average_end')} at the end. peftkit's default loss path (the real-data rows): "
             f"{_fused_default_text(info.get('peftkit_fused_loss_default'))}.", ""]
    quick = any(runs[0][0]["job"].get("quick") for runs in results.values())
    model_name = "a tiny random Llama (--quick)" if quick else "smollm2-135m"
    if "matmul" in results:
        r32, r16 = results["matmul"][0][0], results["matmul"][1][0]
        sizes = ", ".join(f"{n}: {g:.0f}" for n, g in r32["by_size"].items())
        lines += [f"**Matmul peak** (square matmuls, best of 5 per size): fp32 {r32['gflops']:.0f} GFLOP/s by wall time, "
                  f"{r32['gflops_cpu']:.0f} by CPU time (÷ threads) (by size, wall: {sizes}); "
                  f"bf16 {r16['gflops']:.1f} GFLOP/s ({r16['n']}x{r16['n']}; no native bf16 on this CPU, so no bf16 "
                  "training is measured).", ""]
    real = [k for k in results if k.startswith("real-")]
    if real:
        lines += [f"**1. LoRA training on real data** ({model_name}, one pass over the same examples, batch 8, "
                  "fp32; median over rounds)", "",
                  "| dataset | stack | wall s | real tokens/s | padding | positions computed per real token | peak MB | "
                  "speed-up vs reference |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key in real:
            runs = results[key]
            ref = median(r["seconds"] for r in runs[1])
            for job_runs in runs:
                job = job_runs[0]["job"]
                s = median(r["seconds"] for r in job_runs)
                name = {"peftkit": "peftkit defaults", "reference": "Trainer + peft"}[job["stack"]]
                if job.get("variant"):
                    name = f"peftkit, {job['variant']}"
                lines.append(f"| {job['dataset']} ({job['examples']} ex) | {name} | {s:.1f} | "
                             f"{median(r['tokens_per_s'] for r in job_runs):.0f} | "
                             f"{median(r['padding_fraction'] for r in job_runs):.0%} | "
                             f"{job_runs[0]['computed_tokens'] / job_runs[0]['real_tokens']:.2f} | "
                             f"{median(r['peak_delta_mb'] for r in job_runs):.0f} | {ref / s:.2f}x |")
        lines.append("")
    levers = [k for k in results if k.startswith("levers-")]
    if levers:
        lines += ["**Levers on real data** (peftkit, one lever changed from its default at a time; one run each, "
                  f"next to a run of the defaults in the same stretch of time; {model_name}, same examples)", "",
                  "| dataset | peftkit | wall s | real tokens/s | padding | positions computed per real token | peak MB | "
                  "time vs defaults |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key in levers:
            runs = results[key]
            base = runs[0][0]["seconds"]
            for job_runs in runs:
                r = job_runs[0]
                lines.append(f"| {r['job']['dataset']} ({r['job']['examples']} ex) | {r['job'].get('variant', 'defaults')} | "
                             f"{r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['padding_fraction']:.0%} | "
                             f"{r['computed_tokens'] / r['real_tokens']:.2f} | {r['peak_delta_mb']:.0f} | "
                             f"{r['seconds'] / base:.2f}x |")
        lines.append("")
    steps = [k for k in results if k.startswith("step-")]
    if steps:
        lines += step_report(results, steps)
    if "gen" in results:
        timing, memory = results["gen"][0][0], results["gen"][1:]
        job0 = timing["job"]
        variants = timing["variants"]
        lines += [f"**4. Generation latency** ({model_name}, greedy, {job0['new_tokens']} new tokens after a "
                  f"{timing['prompt_tokens']}-token prompt, batch 1; LoRA r 8 on q/v, random non-zero B; variants "
                  f"interleaved on one model changed in place, {job0['repeats']} rounds: medians and medians of per-round ratios; "
                  "peak memory from a process of its own per variant)", "",
                  "| model | s | ms/token | vs base | same tokens as unmerged | peak MB |", "|---|---:|---:|---:|---|---:|"]
        for i, v in enumerate(variants):
            lines.append(f"| {v['variant']} | {v['median_s']:.3f} | {1000 * v['median_s'] / job0['new_tokens']:.1f} | "
                         f"{_ratio(v['times'], variants[0]['times']):.3f}x | {timing['same_tokens_as_unmerged'][i]} | "
                         f"{memory[i][0]['peak_delta_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


STEP_NAMES = {"peftkit": "peftkit LoRA", "peft": "PEFT LoRA", "full": "full FT (peftkit)"}


def step_report(results: dict[str, list[list[dict[str, Any]]]], steps: list[str]) -> list[str]:
    """The fixed-shape step table: wall and CPU-time figures side by side, against the interleaved peak."""
    job0 = results[steps[0]][0][0]["job"]
    timing0 = results[steps[0]][0][0]
    peak0 = timing0["peak"]
    lines = [f"**2-3, 5-6. Fixed-shape training step** (random weights, batch {job0['batch']} x {job0['seq']}, "
             "fp32, forward + backward + clip + AdamW; the configurations' steps interleaved in one process, "
             f"{job0['steps']} timed rounds after one untimed step each, each round starting one configuration "
             "further on: medians, and medians of the per-round ratios; peak memory from a process of its own per "
             f"configuration). {timing0['threads']} torch thread(s). peftkit rows use the fused head + loss "
             "(`lm_loss_sum(..., fused_loss=True)`, passed explicitly) unless marked *plain loss*; both stacks: fused "
             "AdamW, weight decay 0 and gradient clipping at 1.0 (the Trainer's defaults).", "",
             "Two clocks: **wall** time, and this process's **CPU time** ÷ torch threads (a shared CPU's other work "
             "inflates the first, not the second). The fp32 matmul peak is measured both ways in the same process "
             f"before every round ({peak0['n']}x{peak0['n']}, best of {job0.get('peak_repeats', PEAK_REPEATS)}; "
             "median over rounds), and each row's % of peak uses the peak by the same clock. *on CPU*: CPU time ÷ "
             "(wall x threads), 1.00 when nothing else wanted the cores; *switches*: involuntary context switches "
             "per step (the scheduler taking the core away).", "",
             "| model | configuration | s/step wall | s/step CPU | vs PEFT wall / CPU | vs full FT wall / CPU | "
             "first step s | trainable | GFLOP/step | GFLOP/s wall | % of peak wall | GFLOP/s CPU | % of peak CPU | "
             "on CPU | switches/step | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peaks = []
    for key in steps:
        timing, memory = results[key][0][0], results[key][1:]
        configs, specs, threads = timing["configs"], timing["job"]["configs"], timing["threads"]
        ref = {s["stack"]: configs[i] for i, s in enumerate(specs) if s["stack"] in ("peft", "full") and not s.get("variant")}
        for c, spec in zip(configs, specs):
            name = STEP_NAMES[spec["stack"]] + (f", {spec['variant']}" if spec.get("variant") else "")
            mem = [m[0] for m in memory if {k: m[0]["job"].get(k) for k in spec} == spec]
            peak_mb = f"{mem[0]['peak_delta_mb']:.0f}" if mem else "-"
            vs = {k: f"{_ratio(c['times'], r['times']):.2f}x / {_ratio(c['cpu_times'], r['cpu_times']):.2f}x" if r else "-"
                  for k, r in (("peft", ref.get("peft")), ("full", ref.get("full")))}
            lines.append(f"| {timing['job']['shape']} | {name} | {c['median_s']:.2f} | {c['median_cpu_s'] / threads:.2f} | "
                         f"{vs['peft']} | {vs['full']} | {c['first_step_s']:.1f} | {c['trainable']:,} | "
                         f"{c['flops']['total'] / 1e9:.0f} | {c['gflops']:.0f} | {c['of_peak']:.0%} | "
                         f"{c['gflops_cpu']:.0f} | {c['of_peak_cpu']:.0%} | {c['on_cpu']:.2f} | "
                         f"{c['nivcsw_per_step']:.0f} | {peak_mb} |")
        p = timing["peak"]
        load = timing["load"]
        peaks.append(f"{timing['job']['shape']} job: {p['gflops']:.0f} wall, {p['gflops_cpu']:.0f} CPU time (rounds: "
                     + ", ".join(f"{r['gflops']:.0f}/{r['gflops_cpu']:.0f}" for r in p["rounds"])
                     + f"; load average {load['load_average_start'][0]:.1f} -> {load['load_average_end'][0]:.1f})")
    return lines + ["", "fp32 matmul peak in GFLOP/s, median over the rounds (per round wall/CPU): " + "; ".join(peaks) + ".",
                    "", "FLOPs are counted from the model's matmuls, not as 6N: per token 2n forward and 2n backward "
                    "(input gradient) for every linear weight of n elements (LM head included), 2n more only for "
                    "trainable weights (the weight gradient); causal attention 2·S²·d per sequence and layer forward, "
                    "twice that backward.", ""]


def _fused_default_text(d: dict[str, Any] | None) -> str:
    if not d:
        return "unknown"
    on = d.get("train.fused_loss") if d.get("train.fused_loss") is not None else d.get("lm_loss_sum")
    where = "train.fused_loss" if d.get("train.fused_loss") is not None else "lm_loss_sum's fused_loss"
    return f"fused head + loss {'on' if on else 'off'} ({where} default: {on})"


def _ratio(times: list[float], reference: list[float]) -> float:
    """Median of the per-round ratios (round r of both ran back to back)."""
    return median(a / b for a, b in zip(times, reference))


if __name__ == "__main__":
    sys.exit(main())
