"""Peak memory and step time: full fine-tuning vs LoRA vs QLoRA, fp32 and bf16 weights (issue #6).

Every configuration (model x variant x gradient checkpointing) runs in a fresh Python process: it builds the
model, attaches the method, makes peftkit's optimizer and runs ``--steps`` optimizer steps of one random
batch (``--batch`` x ``--seq`` tokens, every position labelled): forward with peftkit's ``lm_loss_sum``,
backward, gradient clipping, AdamW, as :class:`peftkit.train.loop.Trainer` does. It reports:

  weights      every parameter and buffer as stored (quantized weights: packed data + scales)
  B/param      frozen base bytes / base parameters (QLoRA: also per quantized parameter, linear layers only)
  peak         the process's peak RSS (VmHWM: Python + torch + the model + the steps)
  predicted    peftkit's prediction (``peftkit memory``: :func:`peftkit.runs.memory.predict_memory`, computed
               on the meta device before the worker starts)
  step         the median wall time of the steps after the first (the first allocates optimizer states)

Models:
  smollm2-135m  the built-in model, loaded as ``peftkit train`` loads it (fp32 safetensors, memory-mapped)
  llama-1b      TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads, vocab
                32000, untied head: 1.100B parameters) with random weights: built on the meta device and
                filled layer by layer (memory does not depend on the values); QLoRA quantizes each linear
                layer as it is filled, so its fp32 copy never exists in full
  tiny          a 2-layer Llama for ``--quick`` (the smoke test)

Variants (``--variants``): ``full`` (every parameter trains), ``lora`` (r 8, alpha 16, every linear layer, as
QLoRA), ``qlora`` (NF4 + double quantization, LoRA r 8 on every linear layer, embedding and head fp32),
``qlora-bf16-rest`` (``qlora`` + ``method.base_dtype=bf16``: embedding and head stored bf16, computed fp32),
``qlora-small`` (``qlora-bf16-rest`` + ``method.quantize_head=true``: the head NF4 too), ``qlora-int8``
(``method.bits=8``), and ``full-bf16`` / ``lora-bf16`` (the base in bf16; LoRA's weights stay fp32).
bf16 variants compute in bf16: on a CPU without AVX512-BF16/AMX that is ~100-600x slower than fp32, so
there they run no step unless ``--bf16-steps`` says so (their weights and prediction are still reported).

    .venv/bin/python bench/memory.py                                  # everything (~25 min on 2 cores)
    .venv/bin/python bench/memory.py --model llama-1b --variants lora,qlora --checkpointing on --steps 2
    .venv/bin/python bench/memory.py --quick                          # tiny model, seconds

Allocator: the workers run as the ``peftkit`` command does (``--allocator peftkit``: jemalloc with peftkit's
settings when it is installed, see peftkit/allocator.py), or under glibc's malloc (``--allocator system``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SCRIPT = Path(__file__).resolve()
RESULT_TAG = "RESULT "
MB = 2**20
LORA = {"r": 8, "alpha": 16.0, "target_modules": "all-linear"}


@dataclass(frozen=True)
class Variant:
    """One way of fine-tuning: the peftkit method config and the dtype the base is stored in."""

    method: dict[str, Any]
    weights: str = "fp32"  # fp32 | bf16: the base model's dtype before the method is attached
    note: str = ""


VARIANTS: dict[str, Variant] = {
    "full": Variant({"name": "full"}),
    "lora": Variant({"name": "lora", **LORA}),
    "qlora": Variant({"name": "qlora", **LORA}, note="NF4 + double quant; embedding/head fp32"),
    "qlora-bf16-rest": Variant({"name": "qlora", **LORA, "base_dtype": "bf16"},
                               note="NF4; embedding and head stored bf16, computed fp32"),
    "qlora-small": Variant({"name": "qlora", **LORA, "base_dtype": "bf16", "quantize_head": True},
                           note="NF4; embedding bf16, head NF4"),
    "qlora-int8": Variant({"name": "qlora", **LORA, "bits": 8}, note="int8; embedding/head fp32"),
    "full-bf16": Variant({"name": "full"}, "bf16"),
    "lora-bf16": Variant({"name": "lora", **LORA}, "bf16"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a built-in alias, or a Llama config built with random weights."""

    builtin: str | None = None
    llama: dict[str, Any] = field(default_factory=dict)
    batch: int = 2
    seq: int = 128
    about: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(builtin="smollm2-135m", batch=4, seq=128, about="SmolLM2-135M (built-in, tied head)"),
    "llama-1b": ModelSpec(llama=dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                     tie_word_embeddings=False, max_position_embeddings=2048),
                          batch=2, seq=128, about="TinyLlama-1.1B shape, random weights, untied head"),
    "tiny": ModelSpec(llama=dict(hidden_size=128, num_hidden_layers=2, intermediate_size=352, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                                 max_position_embeddings=256),
                      batch=2, seq=32, about="2-layer Llama (smoke test)"),
}
QUICK_VARIANTS = ("full", "lora", "qlora", "qlora-small")
TARGET_MODELS = ("llama-1b", "tiny")  # issue #6 sets its targets on the ~1B model


# -- the worker: one configuration in a fresh process ---------------------------------------------------------
def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(spec: ModelSpec, variant: Variant, seed: int = 0) -> Any:
    """The model with the variant's method attached, built the way the benchmark measures it."""
    import torch

    from peftkit.core.inject import inject
    from peftkit.runs.config import build_method_config

    method = build_method_config(variant.method)
    dtype = torch.bfloat16 if variant.weights == "bf16" else torch.float32
    torch.manual_seed(seed)
    if spec.builtin is not None:
        from peftkit.models import load_model

        model, _ = load_model(spec.builtin, dtype=dtype)
    else:
        model = _random_llama(spec.llama, dtype, method)
    inject(model, method)
    return model


def _random_llama(llama: dict[str, Any], dtype: Any, method: Any) -> Any:
    """A Llama with random weights, filled tensor by tensor from the meta device (QLoRA: each linear layer is
    quantized as soon as it is filled)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**llama)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if method.method_name == "qlora":
        from peftkit.methods.qlora import quantize_base

        quantize_base(model, method, materialize=lambda name, layer: _fill(layer))
    for module in model.modules():
        for key, t in list(module._parameters.items()):
            if t is not None and t.is_meta:
                module._parameters[key] = torch.nn.Parameter(torch.empty_like(t, device="cpu"), t.requires_grad)
                _fill_tensor(module._parameters[key], key)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # buffers computed from the config, on the CPU
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor was left on meta"
    return model


def _fill(module: Any) -> None:
    for key, p in module.named_parameters(recurse=False):
        _fill_tensor(p, key)


def _fill_tensor(p: Any, key: str) -> None:
    import torch

    with torch.no_grad():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02)  # in place: no temporary
        elif key == "weight":
            p.fill_(1.0)  # norms
        else:
            p.zero_()


def weight_stats(model: Any) -> dict[str, Any]:
    """Bytes as stored: the whole model, the frozen base per base parameter, the quantized layers per parameter."""
    from peftkit.core.adapter import adapter_layers, get_state
    from peftkit.methods.quantize import is_quantized
    from peftkit.runs.memory import _logical_numel, _stored_bytes

    names = list(get_state(model).configs)  # what an adapter layer adds (LoRA's A and B), not the base it wraps
    adapter = {id(p) for _, layer in adapter_layers(model) for a in names for _, p in layer.adapter_named_parameters(a)}
    seen: set[int] = set()
    total = base_bytes = base_params = q_bytes = q_params = trainable = 0
    quantized = {id(m.weight) for m in model.modules() if is_quantized(m)}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        stored = _stored_bytes(p)
        total += stored
        trainable += p.numel() if p.requires_grad else 0
        if id(p) not in adapter:
            base_bytes += stored
            base_params += _logical_numel(p)
        if id(p) in quantized:
            q_bytes += stored
            q_params += _logical_numel(p)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "weights_mb": round(total / MB, 1),
        "base_params": base_params,
        "trainable_params": trainable,
        "base_bytes_per_param": round(base_bytes / max(base_params, 1), 4),
        "quantized_bytes_per_param": round(q_bytes / q_params, 4) if q_params else None,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build, attach, and run the steps; the measurements of this process."""
    import torch

    from peftkit.allocator import in_use, release_free_memory
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import enable_gradient_checkpointing
    from peftkit.train.loss import lm_loss_sum
    from peftkit.train.optim import make_optimizer

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    runtime_mb = _status_mb("VmRSS")
    spec, variant = MODELS[job["model"]], VARIANTS[job["variant"]]
    t0 = time.perf_counter()
    model = build_model(spec, variant)
    build_s = time.perf_counter() - t0
    stats = weight_stats(model)
    release_free_memory()  # as `peftkit train` does once the model is built (jemalloc keeps freed pages otherwise)
    after_build = {"build_peak_mb": round(_status_mb("VmHWM"), 1), "after_build_rss_mb": round(_status_mb("VmRSS"), 1)}
    train_cfg = TrainConfig(lr=1e-5, batch_size=job["batch"], max_steps=max(job["steps"], 1), warmup_steps=0,
                            gradient_checkpointing=job["checkpointing"])
    if job.get("optimizer", "adamw") != "adamw":
        train_cfg.optimizer = job["optimizer"]
    optimizer = make_optimizer(model, train_cfg)
    if job["checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=g)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    times, cpu_times, faults, losses = [], [], [], []
    for _ in range(job["steps"]):
        t, c, f = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss_sum, n = lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)  # all threads' CPU time: less exposed to a noisy neighbour
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)  # pages first touched (or re-touched)
        losses.append(round(float(loss_sum.detach()) / n, 4))
    timed = times[1:] if len(times) > 1 else times
    cpu_timed = cpu_times[1:] if len(cpu_times) > 1 else cpu_times
    faults_timed = faults[1:] if len(faults) > 1 else faults
    return {
        **stats, **after_build,
        "runtime_rss_mb": round(runtime_mb, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "build_s": round(build_s, 1),
        "step_s": [round(t, 3) for t in times],
        "median_step_s": round(statistics.median(timed), 3) if timed else None,
        "median_step_cpu_s": round(statistics.median(cpu_timed), 3) if cpu_timed else None,
        "median_step_faults": int(statistics.median(faults_timed)) if faults_timed else None,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "allocator": in_use(),
    }


def load_runtime() -> None:
    """Import what every configuration uses, so that the runtime is loaded before anything is measured."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401 - transformers imports model code lazily

    import peftkit.methods  # noqa: F401
    import peftkit.train.loop  # noqa: F401


def worker(job_json: str) -> None:
    load_runtime()
    job = json.loads(job_json)
    print(RESULT_TAG + json.dumps({"job": job, **run_job(job)}), flush=True)


def run_inline(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (``--quick``): the peak is reset first (VmHWM, via /proc/self/clear_refs),
    but memory this process already holds or its allocator kept counts too, so peaks are only indicative."""
    import gc

    load_runtime()
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    try:
        return {"status": "ok", **run_job(job)}
    except Exception as e:  # noqa: BLE001 - reported in the table like a failed worker
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:200]}"}


# -- the parent: predictions, workers, the table ---------------------------------------------------------------
def predict(spec: ModelSpec, variant: Variant, batch: int, seq: int, checkpointing: bool,
            mmap_threshold: int | None = None) -> dict[str, Any]:
    """peftkit's prediction for this configuration, from the config alone (meta device); ``mmap_threshold``: the
    workers' ``MALLOC_MMAP_THRESHOLD_`` (the prediction then counts no memory kept by glibc's heap)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from peftkit.core.inject import inject
    from peftkit.models import resolve_model
    from peftkit.runs.config import DataConfig, RunConfig
    from peftkit.runs.memory import predict_memory
    from peftkit.train.config import TrainConfig

    dtype = torch.bfloat16 if variant.weights == "bf16" else torch.float32
    if spec.builtin is not None:
        hf = AutoConfig.from_pretrained(resolve_model(spec.builtin), local_files_only=True)
    else:
        hf = LlamaConfig(**spec.llama)
    cfg = RunConfig(model=spec.builtin or "random-llama", method=dict(variant.method),
                    data=DataConfig(max_length=seq, train_on_prompt=True),  # the batch labels every position
                    train=TrainConfig(batch_size=batch, gradient_checkpointing=checkpointing,
                                      precision="bf16" if variant.weights == "bf16" else "fp32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf).to(dtype)
        inject(model, cfg.method_config())
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mmap_threshold:  # the predictor reads the variable of the process it predicts for: the worker's
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        return predict_memory(cfg, model).to_dict()
    finally:
        if mmap_threshold and saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        elif saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh process; its result, or ``{"status": "failed", "reason": ...}``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PEFTKIT_TENSORBOARD": "0"}
    if job.get("mmap_threshold"):  # glibc: allocations of this size and up are mmapped, and unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(job["mmap_threshold"])
    for key, value in (job.get("env") or {}).items():  # e.g. LD_PRELOAD / MALLOC_CONF (bench/allocator.py)
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        if proc.returncode == -9:
            return {"status": "failed", "reason": "killed (SIGKILL: out of memory?)"}
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"status": "failed", "reason": f"exit {proc.returncode}: {tail[0][:200]}"}
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result.pop("job", None)
    return {"status": "ok", **result}


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def native_bf16() -> bool:
    import torch

    from peftkit.train.precision import native_bf16 as native

    return native(torch.device("cpu"))


def run_all(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Every requested configuration, one process each; the report (also written to ``args.out``)."""
    models = list(MODELS) if args.model == "all" else [args.model]
    models = [m for m in models if m != "tiny" or args.model == "tiny"]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    bf16_steps = args.bf16_steps if args.bf16_steps is not None else (args.steps if native_bf16() else 0)
    rows = []
    for model_name in models:
        spec = MODELS[model_name]
        batch, seq = args.batch or spec.batch, args.seq or spec.seq
        steps = args.steps if model_name != "llama-1b" or args.steps_1b is None else args.steps_1b
        for ckpt in ckpts:
            for v in variants:
                variant = VARIANTS[v]
                n_steps = bf16_steps if variant.weights == "bf16" else steps
                job = {"model": model_name, "variant": v, "batch": batch, "seq": seq, "steps": min(n_steps, steps),
                       "checkpointing": ckpt, "threads": args.threads, "optimizer": args.optimizer,
                       "mmap_threshold": args.malloc_mmap_threshold}
                pred = predict(spec, variant, batch, seq, ckpt, args.malloc_mmap_threshold)
                row = {"model": model_name, "variant": v, "weights": variant.weights, "method": variant.method,
                       "malloc_mmap_threshold": args.malloc_mmap_threshold,
                       "note": variant.note, "batch": batch, "seq": seq, "checkpointing": ckpt,
                       "predicted_mb": pred["total"], "predicted": pred}
                free = available_mb()
                if pred["total"] > free - 1024:
                    row.update(status="skipped", reason=f"predicted {pred['total'] / 1024:.1f} GB, "
                                                        f"{free / 1024:.1f} GB available")
                else:
                    started = time.perf_counter()
                    row.update(run_inline(job) if args.in_process else run_worker(job, args.timeout))
                    row["wall_s"] = round(time.perf_counter() - started, 1)
                log(_progress(row), flush=True)
                rows.append(row)
    report = {"command": " ".join(["python", "bench/memory.py", *args.argv]), "machine": machine_info(),
              "rows": rows, "targets": targets(rows), "bf16_steps": bf16_steps}
    if args.optimizer_ratio:
        report["optimizer_ratio"] = optimizer_ratio(quick=args.quick)
    return report


def _progress(row: dict[str, Any]) -> str:
    what = f"{row['model']} {row['variant']}{' +ckpt' if row['checkpointing'] else ''}"
    if row["status"] != "ok":
        return f"  {what}: {row['status']} ({row.get('reason')})"
    return (f"  {what}: peak {row['peak_rss_mb']:.0f} MB (predicted {row['predicted_mb']:.0f}), weights "
            f"{row['weights_mb']:.0f} MB, step {row['median_step_s']} s  [{row['wall_s']:.0f} s]")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #6's targets, set for the ~1B model (and checked on the tiny one by the smoke test), for every QLoRA
    row, against the fp32 LoRA and full rows of the same model and settings."""
    out = []
    for r in rows:
        if not r["variant"].startswith("qlora") or r["status"] != "ok" or r["model"] not in TARGET_MODELS:
            continue
        same = {x["variant"]: x for x in rows if x["model"] == r["model"] and x["checkpointing"] == r["checkpointing"]}
        lora, full = same.get("lora", {}), same.get("full", {})
        t = {"model": r["model"], "variant": r["variant"], "checkpointing": r["checkpointing"],
             "base_bytes_per_param": r["base_bytes_per_param"], "quantized_bytes_per_param": r["quantized_bytes_per_param"],
             "bytes_target_met": r["base_bytes_per_param"] <= 0.6}
        for name, ref, limit in (("lora", lora, 0.35), ("full", full, 0.10)):
            peak = ref.get("peak_rss_mb") if ref.get("status") == "ok" else None
            basis = "measured"
            if peak is None and ref:  # not run (e.g. not enough memory): against its prediction
                peak, basis = ref.get("predicted_mb"), "predicted"
            ratio = r["peak_rss_mb"] / peak if peak else None
            t[f"vs_{name}"] = round(ratio, 3) if ratio else None
            t[f"vs_{name}_basis"] = basis if ratio else None
            t[f"vs_{name}_met"] = ratio <= limit if ratio else None
        out.append(t)
    return out


def optimizer_ratio(quick: bool = False) -> dict[str, Any]:
    """Seconds per step of bitsandbytes' AdamW8bit vs torch's AdamW on the CPU (issue #6: ~4x slower here)."""
    import torch

    numel = 200_000 if quick else 16_900_000  # MEASURED.md's figure was taken on 16.9M parameters
    out: dict[str, Any] = {"params": numel}
    for name in ("torch_adamw", "bnb_adamw8bit"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(numel // 4096 or 1, 4096))
        if name == "torch_adamw":
            opt = torch.optim.AdamW([p], lr=1e-4)
        else:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit([p], lr=1e-4)
        times = []
        for _ in range(6):
            p.grad = torch.randn_like(p)
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        out[f"{name}_s"] = round(statistics.median(times[1:]), 4)
    out["ratio"] = round(out["bnb_adamw8bit_s"] / out["torch_adamw_s"], 2)
    return out


def machine_info() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
    mem = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": any(f.startswith("avx512") for f in flags),
            "avx2": "avx2" in flags, "native_bf16": native_bf16(), "memory_gb": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bnb_version, "load_average": round(os.getloadavg()[0], 1),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "ld_preload": os.environ.get("LD_PRELOAD"),  # e.g. jemalloc instead of glibc's malloc (BENCHMARKS.md)
            "malloc_conf": os.environ.get("MALLOC_CONF")}


# -- the report --------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """The tables of the report, in Markdown."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model]
        r0 = rows[0]
        alloc = f", MALLOC_MMAP_THRESHOLD_={r0['malloc_mmap_threshold']}" if r0.get("malloc_mmap_threshold") else ""
        preload = report.get("machine", {}).get("ld_preload")
        alloc += f", LD_PRELOAD={os.path.basename(preload)}" if preload else ""
        conf = report.get("machine", {}).get("malloc_conf")
        alloc += f", MALLOC_CONF={conf}" if preload and conf else ""
        lines += [f"**{model}** ({MODELS[model].about}), batch {r0['batch']} x {r0['seq']} tokens{alloc}", "",
                  "| variant | ckpt | weights | trainable | weights MB | B/base param | peak RSS MB | predicted MB "
                  "| pred. error | step s | peak vs fp32 LoRA | peak vs fp32 full |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            same = {x["variant"]: x for x in rows if x["checkpointing"] == r["checkpointing"]}
            lines.append(_table_row(r, same))
        lines.append("")
    if report["targets"]:
        lines += ["Issue #6 targets (QLoRA: <= 0.6 bytes per base parameter; peak <= 35% of fp32 LoRA's and <= 10% "
                  "of fp32 full fine-tuning's):", "",
                  "| model | variant | ckpt | B/base param (quantized layers) | vs LoRA | vs full |", "|---|---|---|---|---|---|"]
        for t in report["targets"]:
            qb = f" ({t['quantized_bytes_per_param']:.3f})" if t["quantized_bytes_per_param"] else ""
            lines.append(f"| {t['model']} | {t['variant']} | {'on' if t['checkpointing'] else 'off'} | "
                         f"{t['base_bytes_per_param']:.3f}{qb} {_mark(t['bytes_target_met'])} | "
                         f"{_ratio(t, 'lora')} | {_ratio(t, 'full')} |")
        lines.append("")
    if "optimizer_ratio" in report:
        o = report["optimizer_ratio"]
        lines.append(f"AdamW step on {o['params'] / 1e6:.1f}M parameters (CPU): torch AdamW {o['torch_adamw_s'] * 1e3:.0f} ms, "
                     f"bitsandbytes AdamW8bit {o['bnb_adamw8bit_s'] * 1e3:.0f} ms ({o['ratio']:.1f}x).")
    return "\n".join(lines) + "\n"


def _table_row(r: dict[str, Any], same: dict[str, dict[str, Any]]) -> str:
    ckpt = "on" if r["checkpointing"] else "off"
    pred = f"{r['predicted_mb']:,.0f}"
    if r["status"] != "ok":
        return (f"| {r['variant']} | {ckpt} | {r['weights']} | | | | {r['status']}: {r.get('reason', '')} | {pred} | | | | |")
    bpp = f"{r['base_bytes_per_param']:.3f}"
    if r.get("quantized_bytes_per_param"):
        bpp += f" ({r['quantized_bytes_per_param']:.3f})"
    ran = bool(r["step_s"])
    peak = f"{r['peak_rss_mb']:,.0f}" if ran else f"({r['peak_rss_mb']:,.0f} build only)"
    err = f"{(r['predicted_mb'] - r['peak_rss_mb']) / r['peak_rss_mb']:+.0%}" if ran else ""
    step = f"{r['median_step_s']:.2f}" if ran else "not run"
    vs = []
    for ref in ("lora", "full"):
        x = same.get(ref)
        vs.append(f"{r['peak_rss_mb'] / x['peak_rss_mb']:.0%}" if ran and x and x.get("status") == "ok" and x["step_s"] else "")
    return (f"| {r['variant']} | {ckpt} | {r['weights']} | {r['trainable_params']:,} | {r['weights_mb']:,.0f} | {bpp} | "
            f"{peak} | {pred} | {err} | {step} | {vs[0]} | {vs[1]} |")


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("(met)" if ok else "(missed)")


def _ratio(t: dict[str, Any], ref: str) -> str:
    if t[f"vs_{ref}"] is None:
        return "n/a"
    basis = "" if t[f"vs_{ref}_basis"] == "measured" else f" of {t[f'vs_{ref}_basis']}"
    return f"{t[f'vs_{ref}']:.1%}{basis} {_mark(t[f'vs_{ref}_met'])}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=[*MODELS, "all"], help="which model (all: smollm2-135m and llama-1b)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    p.add_argument("--steps-1b", type=int, default=None, help="steps for llama-1b (default: --steps)")
    p.add_argument("--bf16-steps", type=int, default=None,
                   help="steps for bf16 variants (default: --steps where bf16 is native, else 0)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default per model: smollm2 4, llama-1b 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"], help="gradient checkpointing")
    p.add_argument("--optimizer", default="adamw", help="train.optimizer for every configuration")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker (default: torch's choice)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers: freed blocks of this size and up go back "
                        "to the OS at once (default: glibc's, which keeps most freed memory for reuse)"),
    p.add_argument("--allocator", default="peftkit", choices=["peftkit", "system"],
                   help="peftkit: run as the peftkit command does (jemalloc when installed, peftkit.allocator); "
                        "system: the system's malloc (glibc)")
    p.add_argument("--no-optimizer-ratio", dest="optimizer_ratio", action="store_false",
                   help="skip timing bitsandbytes AdamW8bit against torch AdamW")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out", default=None, help="JSON report path (default bench/results/memory.json; --quick: none)")
    p.add_argument("--in-process", action="store_true",
                   help="run the configurations in this process, one after another (fast; peaks only indicative)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: tiny model, variants {', '.join(QUICK_VARIANTS)}, 2 steps, in process")
    p.add_argument("--rerender", metavar="JSON", help="recompute a saved report's predictions and tables (no runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.model = "tiny"
        if args.variants == ",".join(VARIANTS):
            args.variants = ",".join(QUICK_VARIANTS)
        args.steps = min(args.steps, 2)
        args.in_process = True
        args.bf16_steps = args.steps if args.bf16_steps is None else args.bf16_steps
    return args


def rerender(path: Path) -> str:
    """Refresh a saved report's predictions (the current predictor, same configurations) and its tables."""
    report = json.loads(path.read_text())
    preload, saved = report.get("machine", {}).get("ld_preload"), os.environ.get("LD_PRELOAD")
    if preload:  # the predictor leaves glibc's heap term out under another allocator, as the run's workers did
        os.environ["LD_PRELOAD"] = preload  # only read by the predictor here (a running process loads nothing)
    try:
        for row in report["rows"]:
            spec, variant = MODELS[row["model"]], VARIANTS[row["variant"]]
            row["predicted"] = predict(spec, variant, row["batch"], row["seq"], row["checkpointing"],
                                       row.get("malloc_mmap_threshold"))
            row["predicted_mb"] = row["predicted"]["total"]
    finally:
        if preload and saved is None:
            del os.environ["LD_PRELOAD"]
        elif preload:
            os.environ["LD_PRELOAD"] = saved
    report["targets"] = targets(report["rows"])
    text = markdown(report)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.rerender:
        print(rerender(Path(args.rerender)))
        return 0
    from peftkit import allocator

    if args.allocator == "system":
        if allocator.preloaded():
            raise SystemExit("bench/memory.py --allocator system: LD_PRELOAD names another allocator; unset it")
        os.environ[allocator.ENV] = "system"
    elif not args.in_process and argv is None:  # run as a script, like the peftkit command: this process and its
        allocator.reexec_under_chosen_allocator()  # workers under jemalloc when found (never a caller's process)
    if args.quick:  # before torch starts OpenMP: on a busy machine spinning threads make tiny steps 50x slower
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.perf_counter()
    print(f"bench/memory.py: {args.model}, variants {args.variants}, {args.steps} step(s), checkpointing {args.checkpointing}",
          flush=True)
    report = run_all(args)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = markdown(report)
    print()
    print(text)
    out = args.out or (None if args.quick else str(ROOT / "bench" / "results" / "memory.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        Path(out).with_suffix(".md").write_text(text)
        print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
