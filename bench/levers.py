"""Single speed levers of issue #9, each measured small and fast: kept or dropped by these figures.

Every part times its variants interleaved in one process (A B C A B C ...) and reports medians and the
median of the per-round ratios to the first variant, so a busy minute on a shared CPU hits all of them;
peak memory comes from a fresh process per variant. fp32, one thread by default (``--threads``).

Parts (``--parts``, default all):

  lora-layer  one LoRA-wrapped projection, forward + backward (batch 2 x 128): PEFT's LoRA layer, peftkit's
              layer as it was (B·A·x scaled, then added, out of place) and as it is (one addmm: scale and
              add ride on B's GEMM). Shapes: SmolLM2 q_proj / v_proj, GPT-2 c_attn (Conv1D).
  shared-a    q and v LoRA reading the same input: their A projections apart vs one concatenated [A_q; A_v]
              GEMM, split after (the issue's "LoRA A projection shared where q/k/v read the same input").
              The time saved per layer, as a share of one LoRA decoder layer's forward + backward.
  loss        LM head + cross-entropy at every position of a 2 x 128 batch (SmolLM2: d 576, vocab 49,152), head
              frozen (LoRA) and trainable (full FT): F.cross_entropy on full logits (the plain loss);
              peftkit's fused loss (``linear_cross_entropy_sum``: chunks of positions, gradients made in
              forward) at several chunk sizes; chunks recomputed in backward (``torch.utils.checkpoint``).
  step        a small fixed-shape LoRA step (forward + backward + clip + AdamW, batch 2 x 128, 3-4 layers of
              the GPT-2 / SmolLM2 shapes): peftkit, peftkit with each change of this round undone (one model,
              switched), PEFT (a second model on the same base parameter tensors).

    .venv/bin/python bench/levers.py --out bench/results           # all parts (~6 min on 2 busy cores)
    .venv/bin/python bench/levers.py --parts shared-a loss          # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import machine, median, run_worker, worker_main  # noqa: E402

SCRIPT = Path(__file__).resolve()
PARTS = ("lora-layer", "shared-a", "loss", "step")
BATCH, SEQ = 2, 128
LLAMA = {"hidden": 576, "q": 576, "v": 192, "vocab": 49152}  # SmolLM2-135M: q 576 -> 576, v 576 -> 192 (3 kv heads)
GPT2 = {"hidden": 768, "c_attn": 2304, "vocab": 50257}
STEP_SHAPES = {
    "gpt2": {"model_type": "gpt2", "n_layer": 3},
    "llama": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
              "max_position_embeddings": 2048, "rope_theta": 100000.0},
}


# -- timing ----------------------------------------------------------------------------------------------

#: what is timed: "cpu" (this process's CPU time: with one torch thread every op runs on the calling thread,
#: backward included, so time spent waiting for a core shared with other work is not counted) or "wall"
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds per call of each ``fns`` entry, and the median per-round ratio to the first entry."""
    for fn in fns.values():  # warm-up: allocator, thread pools, first-call work
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - t) / inner)
    first = next(iter(times.values()))
    return {k: {"median_ms": 1000 * median(ts), "ratio": median(a / b for a, b in zip(ts, first))}
            for k, ts in times.items()}


def fwd_bwd(forward: Callable[[Any], Any], x0: Any, params: list[Any]) -> Callable[[], None]:
    """One forward + backward of ``forward`` on a fresh copy of ``x0`` that requires grad (a middle layer's input)."""
    import torch

    grad = torch.randn(forward(x0).shape, generator=torch.Generator().manual_seed(2))

    def run() -> None:
        for p in params:
            p.grad = None
        x = x0.detach().requires_grad_(True)
        forward(x).backward(grad)
    return run


# -- lora-layer ----------------------------------------------------------------------------------------

def lora_before(layer: Any, x: Any) -> Any:
    """peftkit's LoraLinear.forward before this change: B(A(x)) scaled, then added (two (..., out) temporaries)."""
    result = layer.base_layer(x)
    for name in layer.use_adapters():
        A, B = layer.lora_A[name], layer.lora_B[name]
        result = result + (B(A(layer.lora_dropout[name](x))) * layer.scaling[name]).to(result.dtype)
    return result


def _wrapped(base: Any, stack: str) -> Any:
    """``base`` (a Linear or Conv1D) with LoRA r 8, alpha 16 and a non-zero B, by peftkit or PEFT."""
    import torch
    import torch.nn as nn

    import peftkit

    holder = nn.Module()
    holder.proj = base
    torch.manual_seed(0)
    if stack == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False,
                              fan_in_fan_out=type(base).__name__ == "Conv1D")
        holder = peft.inject_adapter_in_model(cfg, holder)
    else:
        peftkit.inject(holder, peftkit.LoraConfig(r=8, alpha=16, target_modules=["proj"], init="random"))
    return holder.proj


def part_lora_layer(rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    rows = []
    for name, make in ((f"SmolLM2 q_proj {LLAMA['hidden']}->{LLAMA['q']}", lambda: nn.Linear(LLAMA["hidden"], LLAMA["q"], bias=False)),
                       (f"SmolLM2 v_proj {LLAMA['hidden']}->{LLAMA['v']}", lambda: nn.Linear(LLAMA["hidden"], LLAMA["v"], bias=False)),
                       (f"GPT-2 c_attn {GPT2['hidden']}->{GPT2['c_attn']} (Conv1D)", lambda: Conv1D(GPT2["c_attn"], GPT2["hidden"]))):
        torch.manual_seed(0)
        base = make().requires_grad_(False)
        ours, theirs = _wrapped(base, "peftkit"), _wrapped(base, "peft")
        d_in = base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.weight.shape[1]
        x0 = torch.randn(BATCH, SEQ, d_in, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours(x0), lora_before(ours, x0), rtol=0, atol=1e-5)
        ours_params = [p for p in ours.parameters() if p.requires_grad]
        theirs_params = [p for p in theirs.parameters() if p.requires_grad]
        res = interleave({"PEFT": fwd_bwd(theirs, x0, theirs_params),
                          "peftkit before (B(A(x))*s, out-of-place add)": fwd_bwd(lambda x: lora_before(ours, x), x0, ours_params),
                          "peftkit now (addmm)": fwd_bwd(ours, x0, ours_params)}, rounds, inner=5)
        rows += [{"part": "lora-layer", "shape": f"{name}, {BATCH} x {SEQ}", "variant": k, **v} for k, v in res.items()]
    return rows


# -- shared-a ------------------------------------------------------------------------------------------

def part_shared_a(rounds: int) -> list[dict[str, Any]]:
    """q/v LoRA on one input: the LoRA part alone (bases outside), A apart vs shared; and a LoRA decoder layer."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    d, r = LLAMA["hidden"], 8
    x0 = torch.randn(BATCH, SEQ, d, generator=g)
    A_q, A_v = (torch.randn(r, d, generator=g).requires_grad_() for _ in range(2))
    B_q, B_v = torch.randn(LLAMA["q"], r, generator=g).requires_grad_(), torch.randn(LLAMA["v"], r, generator=g).requires_grad_()
    base_q, base_v = torch.randn(BATCH, SEQ, LLAMA["q"], generator=g), torch.randn(BATCH, SEQ, LLAMA["v"], generator=g)
    params = [A_q, A_v, B_q, B_v]

    def up(res: torch.Tensor, a: torch.Tensor, B: torch.Tensor) -> torch.Tensor:  # res + 2·a·Bᵀ, as peftkit does it
        return torch.addmm(res.reshape(-1, res.shape[-1]), a.reshape(-1, r), B.T, alpha=2.0).view(res.shape)

    def apart(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([up(base_q, F.linear(x, A_q), B_q), up(base_v, F.linear(x, A_v), B_v)], -1)

    def shared(x: torch.Tensor) -> torch.Tensor:
        a_q, a_v = F.linear(x, torch.cat([A_q, A_v])).split(r, dim=-1)  # one GEMM over x: (B, T, 2r)
        return torch.cat([up(base_q, a_q, B_q), up(base_v, a_v, B_v)], -1)

    torch.testing.assert_close(apart(x0), shared(x0), rtol=1e-4, atol=1e-3)  # values ~1e2: float rounding
    layer, layer_params = _lora_decoder_layer()
    res = interleave({"A apart (as now)": fwd_bwd(apart, x0, params), "A shared ([A_q; A_v])": fwd_bwd(shared, x0, params),
                      "one LoRA decoder layer": fwd_bwd(layer, x0, layer_params)}, rounds, inner=5)
    saved = res["A apart (as now)"]["median_ms"] - res["A shared ([A_q; A_v])"]["median_ms"]
    shape = f"SmolLM2 q+v, {BATCH} x {SEQ}"
    rows = [{"part": "shared-a", "shape": shape, "variant": k, **v} for k, v in res.items()]
    rows.append({"part": "shared-a", "shape": shape, "variant": "saved, share of a decoder layer",
                 "median_ms": saved, "ratio": saved / res["one LoRA decoder layer"]["median_ms"]})
    return rows


def _lora_decoder_layer() -> tuple[Callable[[Any], Any], list[Any]]:
    """One SmolLM2-shaped decoder layer (+ final norm) with peftkit LoRA on q/v: ``x -> hidden states``."""
    from speed import attach, config_model

    model = attach(config_model({**STEP_SHAPES["llama"], "num_hidden_layers": 1}), "peftkit", "llama")
    model.train()
    return (lambda x: model.model(inputs_embeds=x).last_hidden_state), [p for p in model.parameters() if p.requires_grad]


# -- loss ------------------------------------------------------------------------------------------------

HEAD_GRADS = (False, True)  # head frozen (LoRA), trainable (full FT)
LOSS_VARIANTS = ("plain", "fused", "fused-64", "fused-128", "recompute-128")


def loss_fn(variant: str) -> Callable[[Any, Any, Any], Any]:
    """``(hidden (N, d), weight (V, d), target (N,)) -> summed loss`` for one variant."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from peftkit.train.lm_head import linear_cross_entropy_sum

    def plain(h: Any, w: Any, t: Any) -> Any:  # lm_loss_sum's plain loss: full logits, then F.cross_entropy
        return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")

    if variant == "plain":
        return plain
    if variant.startswith("recompute"):  # the plain loss by chunks, each chunk's logits recomputed in backward
        rows = int(variant.split("-")[1])
        return lambda h, w, t: sum(checkpoint(plain, h[s:s + rows], w, t[s:s + rows], use_reentrant=False)
                                   for s in range(0, h.shape[0], rows))
    rows = None if variant == "fused" else int(variant.split("-")[1])
    return lambda h, w, t: linear_cross_entropy_sum(h, w, None, t, rows)


def loss_inputs(positions: int, head_grad: bool) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, LLAMA["hidden"], generator=g)
    weight = (torch.randn(LLAMA["vocab"], LLAMA["hidden"], generator=g) * 0.05).requires_grad_(head_grad)
    return hidden, weight, torch.randint(LLAMA["vocab"], (positions,), generator=g)


def loss_call(variant: str, hidden: Any, weight: Any, target: Any) -> Callable[[], Any]:
    fn = loss_fn(variant)

    def run() -> Any:
        weight.grad = None
        h = hidden.detach().requires_grad_(True)
        loss = fn(h, weight, target)
        loss.backward()
        return loss.detach(), h.grad, weight.grad
    return run


def part_loss(rounds: int, positions: int, threads: int | None, memory: bool = True) -> list[dict[str, Any]]:
    import torch

    rows = []
    for head_grad in HEAD_GRADS:
        inputs = loss_inputs(positions, head_grad)
        ref = loss_call("plain", *inputs)()
        for v in LOSS_VARIANTS[1:]:  # the same loss and gradients as the plain one
            out = loss_call(v, *inputs)()
            for a, b in zip(out, ref):
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        res = interleave({v: loss_call(v, *inputs) for v in LOSS_VARIANTS}, rounds)
        shape = f"{positions} positions, vocab {LLAMA['vocab']}, head {'trainable' if head_grad else 'frozen'}"
        for v, r in res.items():
            rows.append({"part": "loss", "shape": shape, "variant": v, **r})
            if memory:
                job = {"variant": v, "positions": positions, "head_grad": head_grad, "threads": threads}
                rows[-1]["peak_mb"] = run_worker(SCRIPT, job, log=lambda s: None)["loss_peak_mb"]
    return rows


def job_loss_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory one loss call adds: its own process, the first call after the inputs are made (a second
    call would reuse memory the allocator kept from the first, unseen by the resident-set peak)."""
    from _common import peak_rss_mb, reset_peak, rss_mb

    run = loss_call(job["variant"], *loss_inputs(job["positions"], job["head_grad"]))
    before = rss_mb()
    reset_peak()
    run()
    return {"loss_peak_mb": round(peak_rss_mb() - before, 1)}


# -- step --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lora_forward_before() -> Iterator[None]:
    """LoraLinear.forward as it was before this change (for the step's 'undone' variants)."""
    from peftkit.methods.lora import LoraLinear

    now = LoraLinear.forward
    LoraLinear.forward = lambda self, x, *a, **k: lora_before(self, x)  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraLinear.forward = now  # type: ignore[method-assign]


def step_models(shape: str) -> dict[str, Any]:
    """The shape's random model with peftkit LoRA, and a second one with PEFT LoRA on the very same base
    parameters (shared tensors: where weights land in memory moved step times by several percent here)."""
    from speed import attach, config_model

    ours = config_model(STEP_SHAPES[shape])
    theirs = config_model(STEP_SHAPES[shape])
    theirs.load_state_dict(ours.state_dict(keep_vars=True), assign=True)  # the same Parameter objects
    return {"peftkit": attach(ours, "peftkit", shape).train(), "peft": attach(theirs, "peft", shape).train()}


def build_step(model: Any, stack: str, fused_loss: bool = True, lora_before_: bool = False) -> Callable[[], None]:
    """As bench/speed.py's fixed-shape step, small: forward + backward + clip + AdamW."""
    import torch
    from speed import LR

    from peftkit.train.config import TrainConfig
    from peftkit.train.loss import lm_loss_sum
    from peftkit.train.optim import make_optimizer

    ids = torch.randint(model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    if stack == "peft":
        opt = torch.optim.AdamW(params, lr=LR, fused=True)

        def loss() -> Any:
            return model(**batch, use_cache=False).loss
    else:
        opt = make_optimizer(model, TrainConfig(lr=LR))

        def loss() -> Any:
            loss_sum, n = lm_loss_sum(model, batch, fused_loss=fused_loss)
            return loss_sum / n

    def step() -> None:
        with lora_forward_before() if lora_before_ else contextlib.nullcontext():
            loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


STEP_VARIANTS = {  # name: build_step keyword arguments (the peftkit variants share one model)
    "peftkit, fused loss": {"stack": "peftkit"},
    "peftkit, plain loss": {"stack": "peftkit", "fused_loss": False},
    "peftkit, fused loss, LoRA forward as before": {"stack": "peftkit", "lora_before_": True},
    "peftkit as before this round (plain loss, old LoRA forward)": {"stack": "peftkit", "fused_loss": False, "lora_before_": True},
    "PEFT": {"stack": "peft"},
}


def part_step(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for shape in STEP_SHAPES:
        models = step_models(shape)
        steps = {k: build_step(models[kw["stack"]], **kw) for k, kw in STEP_VARIANTS.items()}
        res = interleave(steps, rounds)
        layers = STEP_SHAPES[shape].get("n_layer") or STEP_SHAPES[shape]["num_hidden_layers"]
        rows += [{"part": "step", "shape": f"{shape}, {layers} layers, {BATCH} x {SEQ}", "variant": k, **v}
                 for k, v in res.items()]
    return rows


# -- main ------------------------------------------------------------------------------------------------

def use_quick_shapes() -> None:
    """``--quick``: tiny shapes, every part in seconds (the smoke test)."""
    global BATCH, SEQ
    BATCH, SEQ = 2, 16
    LLAMA.update(hidden=32, q=32, v=16, vocab=300)
    GPT2.update(hidden=32, c_attn=96, vocab=300)
    STEP_SHAPES["gpt2"] = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 300,
                           "n_positions": 64}
    STEP_SHAPES["llama"] = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                            "tie_word_embeddings": True, "max_position_embeddings": 64}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | shape | variant | ms | vs first | peak MB |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.1%}" if r["variant"].startswith("saved") else f"{r['ratio']:.3f}x"
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(f"| {r['part']} | {r['shape']} | {r['variant']} | {r['median_ms']:.2f} | {ratio} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default: all)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per part")
    p.add_argument("--positions", type=int, nargs="+", default=[BATCH * (SEQ - 1)],
                   help="loss: labelled positions, one run each (default 2 x 127; bench/speed.py's step has 4 x 255)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    p.add_argument("--clock", choices=list(CLOCK), default="cpu", help="time CPU time of this process (default; "
                   "robust on a shared CPU with --threads 1) or wall time")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round, no memory processes: a smoke run")
    p.add_argument("--out", type=Path, help="write levers.json and levers.md into this folder")
    args = p.parse_args(argv)
    import torch

    if args.worker:
        job = json.loads(args.worker)
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        worker_main(args.worker, job_loss_memory)
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        use_quick_shapes()
        args.rounds, args.positions = 1, [BATCH * (SEQ - 1)]
    global clock
    clock = CLOCK[args.clock]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for part in args.parts:
        t = time.perf_counter()
        if part == "lora-layer":
            new = part_lora_layer(args.rounds)
        elif part == "shared-a":
            new = part_shared_a(args.rounds)
        elif part == "loss":
            new = [row for n in args.positions for row in part_loss(args.rounds, n, args.threads, not args.quick)]
        else:
            new = part_step(args.rounds)
        print(table(new) + f"({part}: {time.perf_counter() - t:.0f}s)\n", flush=True)
        rows += new
    info = machine()
    cmd = "python bench/levers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Machine: {info['cpu']}, {info['cores']} cores ({info['cpu_capability']}); torch {info['torch']} "
              f"({args.threads} threads), transformers {info['transformers']}, peft {info['peft']}. Load average at the "
              f"end: {info['load_average']}.\nCommand: `{cmd}` ({(time.perf_counter() - start) / 60:.1f} min); "
              f"{args.clock} time, {args.rounds} interleaved rounds, medians; 'vs first' is the median per-round ratio to the first "
              "variant of its group (for 'saved': the share of one decoder layer).\n\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "levers.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        (args.out / "levers.md").write_text(header + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
