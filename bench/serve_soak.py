"""Long-lived use of ``peftkit serve`` (issue #16's bound for the service): thousands of API requests through the
official ``openai`` client, and a worker running job after job, with the server's and the worker's RSS read from
/proc every 100 requests / after every job. Pass: RSS after warm-up grows by at most 5% to the end.

    .venv/bin/python bench/serve_soak.py --requests 3000 --jobs 20 --name serve-soak

The base is a tiny random Llama with the built-in model's tokenizer (the worker's jobs are real runs through the
same code as ``peftkit train``; the API's work does not depend on the base's size). Results: bench/results/NAME.md
and .json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_base(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from soak import random_llama

    return random_llama(folder, hidden=32, intermediate=64, layers=2, positions=512)


def chat(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What colour is thing {i}?"},
                          {"role": "assistant", "content": ["green", "blue", "red"][i % 3]}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--name", default="serve-soak")
    args = p.parse_args()
    import openai

    work = Path(tempfile.mkdtemp(prefix="peftkit-serve-soak-"))
    base = tiny_base(work / "tiny")
    storage = work / "storage"
    peftkit = [sys.executable, "-m", "peftkit"]
    key = subprocess.run([*peftkit, "serve", "keys", "add", "soak", "--storage", str(storage)], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_TENSORBOARD": "0"}
    server = subprocess.Popen([*peftkit, "serve", "--storage", str(storage), "--model", f"tiny={base}", "--port",
                               str(port), "--workers", "1", "--poll", "0.3"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=5)
    for _ in range(300):
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.3)
    worker = int(subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()[0])
    result = {"requests": [], "jobs": []}
    try:
        f = client.files.create(file=("c.jsonl", io.BytesIO(chat(24))), purpose="fine-tune")
        one_epoch = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
        t0 = time.perf_counter()
        for i in range(args.requests):  # a mix: uploads, listings, retrievals, job creation + cancel, events
            kind = i % 10
            if kind == 0:
                g = client.files.create(file=("x.jsonl", io.BytesIO(chat(8 + i % 50))), purpose="fine-tune")
                client.files.delete(g.id)
            elif kind == 1:
                j = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=one_epoch)
                client.fine_tuning.jobs.cancel(j.id)  # before the worker takes it: validation and bookkeeping only
            elif kind < 5:
                list(client.fine_tuning.jobs.list(limit=20))
            elif kind < 8:
                client.files.list()
            else:
                client.models.list()
            if (i + 1) % 100 == 0:
                result["requests"].append({"i": i + 1, "server_mb": round(rss_mb(server.pid), 1),
                                           "s": round(time.perf_counter() - t0, 1)})
        for n in range(args.jobs):
            j = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=one_epoch)
            while (j := client.fine_tuning.jobs.retrieve(j.id)).status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.2)
            result["jobs"].append({"job": n + 1, "status": j.status, "worker_mb": round(rss_mb(worker), 1),
                                   "server_mb": round(rss_mb(server.pid), 1)})
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    write(args, result)


def growth(values: list[float], warm: int) -> float:
    return 100 * (values[-1] - values[warm]) / values[warm]


def write(args: argparse.Namespace, result: dict) -> None:
    req, jobs = result["requests"], result["jobs"]
    warm = min(2, len(req) - 1)
    server = [r["server_mb"] for r in req]
    worker = [j["worker_mb"] for j in jobs]
    summary = {"server_growth_percent": round(growth(server, warm), 1),
               "worker_growth_percent": round(growth(worker, 1), 1) if len(worker) > 1 else None,
               "jobs_succeeded": sum(j["status"] == "succeeded" for j in jobs), "jobs": len(jobs)}
    result["summary"] = summary
    out = ROOT / "bench" / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`.venv/bin/python bench/serve_soak.py --requests {args.requests} --jobs {args.jobs} --name {args.name}`",
             "", f"server RSS after {req[warm]['i']} requests: {server[warm]:,.0f} MB; after {req[-1]['i']}: "
             f"{server[-1]:,.0f} MB ({summary['server_growth_percent']:+.1f}%); {req[-1]['s']:.0f} s for the requests",
             f"worker RSS after job 2: {worker[1] if len(worker) > 1 else float('nan'):,.0f} MB; "
             f"after job {len(worker)}: "
             f"{worker[-1] if worker else float('nan'):,.0f} MB ({summary['worker_growth_percent']}%); "
             f"{summary['jobs_succeeded']}/{len(jobs)} jobs succeeded", "",
             "| requests | server RSS MB |", "|---:|---:|", *[f"| {r['i']} | {r['server_mb']:,.1f} |" for r in req], "",
             "| job | worker RSS MB | server RSS MB |", "|---:|---:|---:|",
             *[f"| {j['job']} | {j['worker_mb']:,.1f} | {j['server_mb']:,.1f} |" for j in jobs]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4]))


if __name__ == "__main__":
    main()
