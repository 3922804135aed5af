"""What the service does to its database, without HTTP: keys, files, jobs and their queue, events, checkpoints.

Every function takes a session and commits what it changes; the API (``api.py``) and the workers
(``worker.py``) call these, so the rules (who owns what, which status may follow which, how a job is claimed)
live in one place.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from peftkit.errors import PeftkitError
from peftkit.serve.db import ApiKey, Checkpoint, Event, File, Job, new_id, now

Row = TypeVar("Row", File, Job, Event, Checkpoint)
#: a job in one of these has ended: it is never run again
FINAL = ("succeeded", "failed", "cancelled")
#: a worker holds a job in one of these (its heartbeat must stay fresh)
HELD = ("running", "pausing")


class NotFound(PeftkitError):
    """No such object for this key (another key's objects are not found either)."""


class Conflict(PeftkitError):
    """The object is in a state that does not allow the request (e.g. cancelling a finished job)."""


# -- keys ------------------------------------------------------------------------------------------
def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key(s: Session, name: str) -> str:
    """A new key named ``name``; the key itself is returned once and only its SHA-256 kept."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise PeftkitError(f"key name {name[:80]!r}: use 1-64 letters, digits, '-', '_' or '.'")
    if s.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))) is not None:
        raise Conflict(f"a key named {name!r} exists (revoke it first, or choose another name)")
    key = "pk-" + secrets.token_urlsafe(32)
    s.add(ApiKey(id=new_id("key", 16), name=name, digest=_digest(key), created_at=now()))
    s.commit()
    return key


def list_keys(s: Session) -> list[ApiKey]:
    return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)))


def revoke_key(s: Session, name: str) -> None:
    row = s.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if row is None:
        raise NotFound(f"no active key named {name!r}")
    row.revoked_at = now()
    s.commit()


def key_for(s: Session, key: str) -> ApiKey | None:
    """The active key whose secret is ``key``, or None."""
    digest = _digest(key)
    row = s.scalar(select(ApiKey).where(ApiKey.digest == digest, ApiKey.revoked_at.is_(None)))
    return row if row is not None and hmac.compare_digest(row.digest, digest) else None


# -- paging ----------------------------------------------------------------------------------------
def page(s: Session, model: type[Row], where: Sequence[Any], after: str | None, limit: int,
         newest_first: bool = True) -> tuple[list[Row], bool]:
    """One page of ``model`` rows matching ``where`` after the row whose id is ``after`` (cursor paging as the
    ``openai`` client does it: it sends the last id it got); ``(rows, has_more)``."""
    query = select(model).where(*where)
    if after:
        seq = s.scalar(select(model.seq).where(model.id == after, *where))
        if seq is None:
            raise NotFound(f"after: no {model.__tablename__[:-1]} {after!r}")
        query = query.where(model.seq < seq if newest_first else model.seq > seq)
    order = model.seq.desc() if newest_first else model.seq.asc()
    rows = list(s.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# -- files -----------------------------------------------------------------------------------------
def add_file(s: Session, owner: str, filename: str, purpose: str, data: bytes, lines: int, storage: Path) -> File:
    """Store an (already validated) upload under its id, written whole before the row exists."""
    row = File(id=new_id("file"), owner=owner, filename=filename[:256], purpose=purpose, bytes=len(data),
               lines=lines, created_at=now())
    path = file_path(storage, row.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    s.add(row)
    s.commit()
    return row


def file_path(storage: Path, file_id: str) -> Path:
    return Path(storage) / "files" / f"{file_id}.jsonl"


def get_file(s: Session, owner: str, file_id: str) -> File:
    row = s.scalar(select(File).where(File.id == file_id, File.owner == owner))
    if row is None:
        raise NotFound(f"No such File object: {file_id}")
    return row


def delete_file(s: Session, owner: str, file_id: str, storage: Path) -> None:
    row = get_file(s, owner, file_id)
    active = s.scalar(select(Job.id).where(or_(Job.training_file == file_id, Job.validation_file == file_id),
                                           Job.status.not_in(FINAL)).limit(1))
    if active is not None:
        raise Conflict(f"file {file_id} is used by job {active}, which has not ended; cancel it first")
    s.delete(row)
    s.commit()
    file_path(storage, file_id).unlink(missing_ok=True)


# -- jobs ------------------------------------------------------------------------------------------
def get_job(s: Session, owner: str | None, job_id: str) -> Job:
    where = [Job.id == job_id] + ([Job.owner == owner] if owner is not None else [])
    row = s.scalar(select(Job).where(*where))
    if row is None:
        raise NotFound(f"No such fine-tuning job: {job_id}")
    return row


def add_event(s: Session, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict[str, Any] | None = None, step: int | None = None, commit: bool = True) -> bool:
    """Log an event; a metrics event for a step the job has logged already is skipped (False)."""
    s.add(Event(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, message=message, type=type_,
                data=data, step=step))
    return _commit_new(s) if commit else True


def _commit_new(s: Session) -> bool:
    """Commit what was added; False (and nothing kept) when a unique index says it exists already."""
    try:
        s.commit()
    except IntegrityError:
        s.rollback()
        return False
    return True


def set_status(s: Session, job: Job, status: str, message: str, level: str = "info", **fields: Any) -> None:
    job.status = status
    for k, v in fields.items():
        setattr(job, k, v)
    if status in FINAL and job.finished_at is None:
        job.finished_at = now()
    add_event(s, job.id, message, level=level, commit=False)
    s.commit()


def cancel(s: Session, owner: str, job_id: str) -> Job:
    """Cancel: a job not yet running ends now; a running one is stopped by its worker after it writes a checkpoint
    of the finished step (the worker sees the status on its next heartbeat)."""
    job = get_job(s, owner, job_id)
    if job.status in FINAL:
        raise Conflict(f"Job {job_id} has already {'been cancelled' if job.status == 'cancelled' else job.status}")
    set_status(s, job, "cancelled", "Job cancelled")
    return job


def pause(s: Session, owner: str, job_id: str) -> Job:
    job = get_job(s, owner, job_id)
    if job.status in ("pausing", "paused"):
        return job
    if job.status in FINAL:
        raise Conflict(f"Job {job_id} has {job.status}; only a job that has not ended can be paused")
    held = job.status in HELD
    set_status(s, job, "pausing" if held else "paused", "Job pausing" if held else "Job paused")
    return job


def resume(s: Session, owner: str, job_id: str) -> Job:
    job = get_job(s, owner, job_id)
    if job.status != "paused":
        raise Conflict(f"Job {job_id} is {job.status}; only a paused job can be resumed")
    set_status(s, job, "queued", "Job resumed: queued to continue from its last checkpoint")
    return job


def claim(s: Session, worker: str, lease_s: float, is_dead: Callable[[str | None], bool] = lambda w: False,
          ) -> Job | None:
    """Take the oldest queued job for ``worker`` (atomically: a conditional update that only one worker's
    transaction can win; PostgreSQL also skips rows another worker has locked). Jobs whose worker stopped
    heart-beating for ``lease_s`` (or ``is_dead``) are re-queued first."""
    requeue_stale(s, lease_s, is_dead)
    for _ in range(5):
        query = select(Job.id).where(Job.status == "queued").order_by(Job.seq).limit(1)
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = s.scalar(query)
        if job_id is None:
            s.rollback()
            return None
        won = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="running", worker=worker, heartbeat_at=time.time(), attempts=Job.attempts + 1)).rowcount
        s.commit()
        if won:
            return get_job(s, None, job_id)
    return None


def requeue_stale(s: Session, lease_s: float, is_dead: Callable[[str | None], bool] = lambda w: False) -> list[str]:
    """Jobs held by a worker that stopped heart-beating (or ``is_dead``): back to the queue (a pausing one: paused)."""
    cutoff = time.time() - lease_s
    held = list(s.scalars(select(Job).where(Job.status.in_(HELD))))
    stale = [j for j in held if j.heartbeat_at is None or j.heartbeat_at < cutoff or is_dead(j.worker)]
    for job in stale:
        then, worker = job.status, job.worker  # read before the update clears them on the loaded row
        won = s.execute(update(Job).where(and_(Job.id == job.id, Job.status == then, Job.worker == worker))
                        .values(status="queued" if then == "running" else "paused", worker=None)).rowcount
        if won:
            add_event(s, job.id, f"Worker {worker} stopped responding; the job "
                      f"{'is queued again and resumes' if then == 'running' else 'is paused; resuming continues'} "
                      "from its last checkpoint", level="warn", commit=False)
    s.commit()
    return [j.id for j in stale]


def heartbeat(s: Session, job_id: str, worker: str) -> str | None:
    """Refresh a held job's heartbeat; its status (the worker stops the job on cancelled/pausing), or None when
    the job is no longer this worker's."""
    won = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker).values(heartbeat_at=time.time())).rowcount
    s.commit()
    return s.scalar(select(Job.status).where(Job.id == job_id)) if won else None


def add_checkpoint(s: Session, job_id: str, step: int, metrics: dict[str, Any]) -> bool:
    s.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=step, created_at=now(), metrics=metrics))
    return _commit_new(s)


def drop_checkpoints(s: Session, job_id: str, keep: set[int]) -> None:
    """Forget checkpoints no longer on disk (a run keeps its last few)."""
    for row in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)):
        if row.step not in keep:
            s.delete(row)
    s.commit()


def fine_tuned_models(s: Session, owner: str) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.owner == owner, Job.status == "succeeded",
                                            Job.fine_tuned_model.is_not(None), Job.model_deleted.is_(False))
                          .order_by(Job.seq)))
