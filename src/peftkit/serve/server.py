"""Starting the service: the API (uvicorn) with its workers in child processes, or a worker alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from peftkit.serve.db import connect
from peftkit.serve.settings import ServeSettings


def worker_command(settings: ServeSettings) -> list[str]:
    """``peftkit worker`` with the same storage, database, bases and timings."""
    cmd = [sys.executable, "-m", "peftkit", "worker", "--storage", str(settings.storage),
           "--lease", str(settings.lease_s), "--poll", str(settings.poll_s)]
    if settings.database:
        cmd += ["--database", settings.database]
    for name, path in settings.models.items():
        cmd += ["--model", f"{name}={path}"]
    return cmd


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the API until interrupted, with ``workers`` worker processes (killed with the server)."""
    import uvicorn

    from peftkit.serve.api import create_app
    from peftkit.serve.worker import die_with_parent

    settings.storage.mkdir(parents=True, exist_ok=True)
    sessions = connect(settings.storage, settings.database)  # migrate once, before the workers start
    procs = [subprocess.Popen(worker_command(settings), preexec_fn=die_with_parent) for _ in range(workers)]
    try:
        uvicorn.run(create_app(settings, sessions), host=host, port=port, log_level="warning")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)  # each stops its job after a checkpoint; it is queued again
        for p in procs:
            try:
                p.wait(timeout=150)
            except subprocess.TimeoutExpired:
                p.kill()


def work(settings: ServeSettings) -> None:
    """Run one worker until SIGTERM/SIGINT (a running job is stopped after a checkpoint and queued again)."""
    from peftkit.serve.worker import Worker

    settings.storage.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(settings).run(stop)
