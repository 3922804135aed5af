"""Workers: take queued jobs from the database, run each in a child process, report what it does.

A job runs as ``peftkit train JOB/config.yaml [--resume]`` would, in a process forked from the worker (which
imported torch and transformers once: a job starts in about a second): the same ``runs/`` code, so its folder
(``STORAGE/jobs/<id>/run``) is an ordinary run folder. The child is killed with its worker
(``PR_SET_PDEATHSIG``), and a crash or out-of-memory kill in it fails the job, never the worker.
While it runs the worker heart-beats the job, turns new lines of the run's ``metrics.jsonl`` into events and its
checkpoints into checkpoint objects, and stops it (SIGTERM: the run writes a checkpoint of the finished step and
exits) when the job is cancelled or paused. A job whose worker died is queued again by the next worker that
looks for work (:func:`peftkit.serve.store.claim`) and resumes from its last checkpoint: the same adapter as an
uninterrupted run.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session, sessionmaker

from peftkit.serve import store
from peftkit.serve.db import Job, connect
from peftkit.serve.jobs import fine_tuned_name, job_dir, run_config
from peftkit.serve.settings import ServeSettings, worker_is_dead, worker_name

#: seconds a stopped child may take to write its checkpoint before it is killed
STOP_GRACE_S = 120.0


def die_with_parent() -> None:  # pragma: no cover - runs in a child process
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def preload() -> None:
    """Import what a run needs once, in the worker: each job's process is forked from it and starts training in
    about a second instead of importing torch and transformers again (~10 s)."""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (the lazy modules, resolved)

    import peftkit.runs.run  # noqa: F401


def _start(cfg_path: Path, resume: bool, log: Path) -> BaseProcess:
    """The job's process: forked from the worker (imports already done), dying with it."""
    child = multiprocessing.get_context("fork").Process(target=_train_child, args=(cfg_path, resume, log),
                                                       daemon=False)
    child.start()
    return child


def _train_child(cfg_path: Path, resume: bool, log: Path) -> None:  # pragma: no cover - runs in the job's process
    """``peftkit train CONFIG [--resume]`` in the forked process: output to ``log``, a user error as one
    ``peftkit: error:`` line and exit code 2 (as the command), SIGTERM/SIGINT: checkpoint and exit."""
    import os

    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # the worker's own handlers are not the run's
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    from peftkit.errors import PeftkitError
    from peftkit.runs.config import load_config
    from peftkit.runs.run import train_run

    try:
        train_run(load_config(str(cfg_path)), resume=resume, show_progress=None)
    except (PeftkitError, OSError) as e:
        print(f"peftkit: error: {str(e).replace(chr(10), ' ')[:2000]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # stopped by a signal after a checkpoint
        print(f"peftkit: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))


@dataclass
class Progress:
    """What the worker has already reported of one job's run folder."""

    run: Path
    total: int
    offset: int = 0
    losses: dict[int, float] = field(default_factory=dict)


class Worker:
    """One worker: :meth:`run` loops until ``stop`` is set, one job at a time."""

    def __init__(self, settings: ServeSettings, sessions: sessionmaker | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.sessions = sessions or connect(settings.storage, settings.database)
        self.name = name or worker_name()

    def run(self, stop: threading.Event | None = None, once: bool = False) -> None:
        stop = stop or threading.Event()
        preload()
        while not stop.is_set():
            with self.sessions() as s:
                job = store.claim(s, self.name, self.settings.lease_s, worker_is_dead)
            if job is not None:
                self.run_job(job, stop)
            elif once:
                return
            else:
                stop.wait(self.settings.poll_s)

    # -- one job -----------------------------------------------------------------------------------
    def run_job(self, job: Job, stop: threading.Event) -> None:
        folder = job_dir(self.settings.storage, job.id)
        try:
            cfg_path, progress, resume = self._prepare(job, folder)
        except Exception as e:  # noqa: BLE001 - a job that cannot start fails with the reason; the worker goes on
            self._finish_failed(job.id, "invalid_job", f"cannot start: {str(e).splitlines()[0][:500]}")
            return
        with self.sessions() as s:
            store.add_event(s, job.id, f"Fine-tuning job {'resumed from step ' + str(resume) if resume else 'started'}"
                            f" on worker {self.name}", data={"attempt": job.attempts})
        child = _start(cfg_path, bool(resume), folder / "train.log")
        status = self._watch(job, child, progress, stop)
        self._sync(job, progress)
        child.join()
        self._finish(job, child.exitcode, status, folder, stop.is_set())

    def _prepare(self, job: Job, folder: Path) -> tuple[Path, Progress, int]:
        from peftkit.train.checkpoint import list_checkpoints

        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = folder / "config.yaml"
        with self.sessions() as s:
            examples = store.get_file(s, job.owner, job.training_file).lines
        cfg = run_config(job, self.settings.storage, self.settings.base_path(job.model), examples)
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tmp.replace(cfg_path)
        run = Path(cfg["output_dir"])
        done = list_checkpoints(run)
        resume = int(done[-1].name.split("-")[1]) if done else 0
        return cfg_path, Progress(run, cfg["train"]["max_steps"]), resume

    def _watch(self, job: Job, child: BaseProcess, progress: Progress, stop: threading.Event) -> str | None:
        """Heart-beat and report until the child exits; stop it when the job is cancelled, paused or taken away
        (or the worker is stopping). The job's last status seen (None: no longer this worker's)."""
        status: str | None = "running"
        stopping_since = None
        while child.is_alive():
            time.sleep(min(self.settings.poll_s, 0.5))
            with self.sessions() as s:
                status = store.heartbeat(s, job.id, self.name)
            self._sync(job, progress)
            if stopping_since is None and (status in (None, "cancelled", "pausing") or stop.is_set()):
                child.terminate()  # SIGTERM: the run checkpoints the finished step and exits
                stopping_since = time.monotonic()
            elif stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_S:
                child.kill()
        return status

    def _sync(self, job: Job, progress: Progress) -> None:
        """New logged steps -> metrics events; checkpoints on disk -> checkpoint objects."""
        from peftkit.train.checkpoint import list_checkpoints

        rows = _new_metrics(progress)
        with self.sessions() as s:
            for row in rows:
                if "loss" in row:
                    progress.losses[row["step"]] = row["loss"]
                    data = {"step": row["step"], "train_loss": row["loss"], "total_steps": progress.total}
                    if "eval_loss" in row:
                        data["valid_loss"] = row["eval_loss"]
                    store.add_event(s, job.id, f"Step {row['step']}/{progress.total}: training loss={row['loss']:.4f}",
                                    type_="metrics", data=data, step=row["step"])
            steps = {int(p.name.split("-")[1]) for p in list_checkpoints(progress.run)}
            for step in sorted(steps):
                metrics = {"step": step, "train_loss": progress.losses.get(step)}
                if store.add_checkpoint(s, job.id, step, metrics):
                    store.add_event(s, job.id, f"Checkpoint written at step {step}", data={"step": step})
            store.drop_checkpoints(s, job.id, steps)

    def _finish(self, job: Job, code: int | None, status: str | None, folder: Path, stopping: bool) -> None:
        with self.sessions() as s:
            row = store.get_job(s, None, job.id)
            if status is None or row.worker != self.name:
                return  # another worker holds it now
            if row.status == "cancelled":
                store.set_status(s, row, "cancelled", "Job stopped after its last checkpoint", worker=None)
            elif row.status == "pausing":
                store.set_status(s, row, "paused", "Job paused; resume continues from its last checkpoint", worker=None)
            elif code == 0:
                summary = json.loads((folder / "run" / "run_summary.json").read_text())
                name = fine_tuned_name(row.model, row.suffix, row.id)
                store.set_status(s, row, "succeeded", "The job has successfully completed", worker=None,
                                 fine_tuned_model=name, trained_tokens=int(summary.get("tokens") or 0))
            elif stopping and row.status == "running":
                store.set_status(s, row, "queued", "Worker stopped: the job is queued again and resumes from its "
                                 "last checkpoint", worker=None)
            else:
                self._fail(s, row, code, folder)

    def _fail(self, s: Session, row: Job, code: int | None, folder: Path) -> None:
        reason = _last_line(folder / "train.log") or f"the training process exited with {code}"
        kind = "out_of_memory" if code == -signal.SIGKILL else "training_failed"
        if kind == "out_of_memory":
            reason = f"the training process was killed (out of memory?); last output: {reason}"
        store.set_status(s, row, "failed", f"Job failed: {reason}", level="error", worker=None,
                         error={"code": kind, "message": reason, "param": None})

    def _finish_failed(self, job_id: str, code: str, message: str) -> None:
        with self.sessions() as s:
            row = store.get_job(s, None, job_id)
            store.set_status(s, row, "failed", f"Job failed: {message}", level="error", worker=None,
                             error={"code": code, "message": message, "param": None})


def _new_metrics(progress: Progress) -> list[dict[str, Any]]:
    path = progress.run / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(progress.offset)
            chunk = f.read()
    except FileNotFoundError:
        return []
    end = chunk.rfind(b"\n") + 1  # a line being written is read next time
    progress.offset += end
    rows = []
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _last_line(path: Path) -> str:
    """The last line the child printed (a peftkit error is one line: ``peftkit: error: ...``)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("peftkit: error:")]
    line = (errors or lines or [""])[-1]
    return line.removeprefix("peftkit: error: ")[:1000]
