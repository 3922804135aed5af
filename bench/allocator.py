"""glibc's malloc vs jemalloc for peftkit's training steps: peak memory and step time, alternating (issue #6).

The same job as bench/memory.py's (build the model, attach the method, ``--steps`` optimizer steps of one random
batch) runs in a fresh process per allocator, the allocators alternating within every round so that drift on a
noisy machine falls on all of them alike. It reports, per variant, the median over rounds of each process's
peak RSS, median step wall time, CPU time (all threads) and minor page faults, and ratios (per round) to the
first allocator's.

Allocators:
  glibc       the C library's malloc (LD_PRELOAD and MALLOC_CONF cleared)
  jemalloc    jemalloc preloaded with its default settings
  peftkit     what the ``peftkit`` command runs under by default (:mod:`peftkit.allocator`: jemalloc preloaded
              with peftkit's MALLOC_CONF)
  jemalloc:CONF  jemalloc with MALLOC_CONF=CONF

    .venv/bin/python bench/allocator.py --model smollm2-135m --variants lora,qlora,full --rounds 2 --steps 5 \
        --allocator glibc --allocator jemalloc --allocator jemalloc:background_thread:true,dirty_decay_ms:30000
    .venv/bin/python bench/allocator.py --model llama-1b --checkpointing on --variants lora,qlora --rounds 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as membench  # noqa: E402  (bench/memory.py: the worker and the models)

from peftkit import allocator  # noqa: E402


def allocator_env(name: str) -> dict[str, str | None]:
    """The environment a worker runs under for allocator ``name`` (None: the variable is removed)."""
    if name == "glibc":
        return {"LD_PRELOAD": None, "MALLOC_CONF": None, allocator.ENV: "system"}
    lib = allocator.find_jemalloc()
    if lib is None:
        raise SystemExit("bench/allocator.py: jemalloc not found (apt-get install libjemalloc2)")
    if name == "jemalloc":
        return {"LD_PRELOAD": lib, "MALLOC_CONF": None, allocator.ENV: "system"}
    if name == "peftkit":
        return {"LD_PRELOAD": lib, "MALLOC_CONF": allocator.MALLOC_CONF, allocator.ENV: "system"}
    if name.startswith("jemalloc:"):
        return {"LD_PRELOAD": lib, "MALLOC_CONF": name.split(":", 1)[1], allocator.ENV: "system"}
    raise SystemExit(f"--allocators: unknown allocator {name!r} (glibc, jemalloc, peftkit, jemalloc:CONF)")


def fault_cost_us(mb: int = 256, repeats: int = 3) -> float:
    """Microseconds a first touch of a fresh page costs here, over a second write of the same page (median):
    page faults are what an allocator that hands pages back makes a step pay again."""
    import ctypes
    import mmap

    size, costs = mb * 2**20, []
    for _ in range(repeats):
        region = mmap.mmap(-1, size)
        view = ctypes.c_char.from_buffer(region)
        t0 = time.perf_counter()
        ctypes.memset(ctypes.addressof(view), 1, size)
        t1 = time.perf_counter()
        ctypes.memset(ctypes.addressof(view), 2, size)
        t2 = time.perf_counter()
        del view
        region.close()
        costs.append(((t1 - t0) - (t2 - t1)) / (size / mmap.PAGESIZE) * 1e6)
    return round(statistics.median(costs), 2)


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    spec = membench.MODELS[args.model]
    batch, seq = args.batch or spec.batch, args.seq or spec.seq
    allocs = args.allocators or ["glibc", "peftkit"]
    envs = {a: allocator_env(a) for a in allocs}
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for v in args.variants.split(","):
            if v not in membench.VARIANTS:
                raise SystemExit(f"--variants: unknown variant {v!r}")
            order = allocs[rnd % len(allocs):] + allocs[:rnd % len(allocs)]  # who goes first rotates per round
            for a in order:
                job = {"model": args.model, "variant": v, "batch": batch, "seq": seq, "steps": args.steps,
                       "checkpointing": args.checkpointing == "on", "threads": args.threads, "optimizer": "adamw",
                       "mmap_threshold": None, "env": envs[a]}
                started = time.perf_counter()
                out = membench.run_worker(job, args.timeout)
                row = {"round": rnd, "variant": v, "allocator": a, "status": out["status"],
                       "peak_rss_mb": out.get("peak_rss_mb"), "step_s": out.get("step_s"),
                       "median_step_s": out.get("median_step_s"), "median_step_cpu_s": out.get("median_step_cpu_s"),
                       "median_step_faults": out.get("median_step_faults"), "ran_under": out.get("allocator"),
                       "reason": out.get("reason"),
                       "wall_s": round(time.perf_counter() - started, 1)}
                runs.append(row)
                log(f"  round {rnd} {v} {a}: " + (f"peak {row['peak_rss_mb']:.0f} MB, step {row['median_step_s']} s, "
                                                 f"cpu {row['median_step_cpu_s']} s, {row['median_step_faults']} faults"
                                                 if row["status"] == "ok" else f"{row['status']} ({row['reason']})"),
                    flush=True)
    fault_us = fault_cost_us()
    log(f"  a page fault costs {fault_us} us here", flush=True)
    return {"command": " ".join(["python", "bench/allocator.py", *args.argv]), "machine": membench.machine_info(),
            "fault_cost_us": fault_us,
            "model": args.model, "batch": batch, "seq": seq, "steps": args.steps, "checkpointing": args.checkpointing,
            "allocators": allocs, "envs": envs, "runs": runs, "summary": summary(runs, allocs)}


def summary(runs: list[dict[str, Any]], allocs: list[str]) -> list[dict[str, Any]]:
    out = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        base = None
        for a in allocs:
            ok = [r for r in runs if r["variant"] == v and r["allocator"] == a and r["status"] == "ok"]
            if not ok:
                continue
            row = {"variant": v, "allocator": a, "n": len(ok),
                   "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in ok), 1),
                   "median_step_s": round(statistics.median(r["median_step_s"] for r in ok), 3),
                   "median_step_cpu_s": round(statistics.median(r["median_step_cpu_s"] for r in ok), 3),
                   "median_step_faults": int(statistics.median(r["median_step_faults"] for r in ok)),
                   "peaks": [r["peak_rss_mb"] for r in ok], "steps": [r["median_step_s"] for r in ok],
                   "cpu_steps": [r["median_step_cpu_s"] for r in ok]}
            if a == allocs[0]:
                base = row
            if base is not None:
                row["peak_vs_first"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
                firsts = {b["round"]: b for b in runs if b["variant"] == v and b["allocator"] == allocs[0]
                          and b["status"] == "ok"}
                for key, name in (("median_step_s", "step_vs_first"), ("median_step_cpu_s", "cpu_vs_first")):
                    # per round: each process against the first allocator's process of the same round
                    ratios = [r[key] / firsts[r["round"]][key] for r in ok if r["round"] in firsts]
                    row[name] = round(statistics.median(ratios), 3) if ratios else None
            out.append(row)
    return out


def markdown(report: dict[str, Any]) -> str:
    first = report["allocators"][0]
    lines = [f"**{report['model']}**, batch {report['batch']} x {report['seq']}, {report['steps']} steps per process, "
             f"checkpointing {report['checkpointing']}; allocators alternating within each round", "",
             f"| variant | allocator | runs | peak RSS MB (each run) | peak vs {first} | wall s/step (each run) | "
             f"wall vs {first} | CPU s/step (each run) | CPU vs {first} | page faults/step |",
             "|---|---|---:|---|---:|---|---:|---|---:|---:|"]
    for r in report["summary"]:
        lines.append(f"| {r['variant']} | {r['allocator']} | {r['n']} | "
                     f"{' / '.join(f'{p:,.0f}' for p in r['peaks'])} | {r.get('peak_vs_first', '')} | "
                     f"{' / '.join(f'{s:.2f}' for s in r['steps'])} | {r.get('step_vs_first', '')} | "
                     f"{' / '.join(f'{s:.2f}' for s in r['cpu_steps'])} | {r.get('cpu_vs_first', '')} | "
                     f"{r['median_step_faults']:,} |")
    if report.get("fault_cost_us"):
        lines += ["", f"A page fault (first touch of a fresh page) cost {report['fault_cost_us']} us here: "
                      f"10,000 faults a step are {report['fault_cost_us'] * 1e4 / 1e6:.2f} s of it."]
    lines += ["", "Environments: " + "; ".join(
        f"{a}: " + (", ".join(f"{k}={v}" for k, v in e.items() if v and k != allocator.ENV) or "defaults")
        for a, e in report["envs"].items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=list(membench.MODELS))
    p.add_argument("--variants", default="lora,qlora,full")
    p.add_argument("--allocator", dest="allocators", action="append", default=None,
                   help="an allocator to run (repeat the option; the first is the reference; default: glibc, peftkit)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per process (the first is not timed)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--checkpointing", default="off", choices=["off", "on"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None, help="JSON report path (the Markdown table next to it)")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
