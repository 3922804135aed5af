"""The service's state: API keys, files, fine-tuning jobs, their events and checkpoints (SQLAlchemy 2).

One schema for SQLite (the default: one file in the storage folder, nothing to install) and PostgreSQL
(``--database postgresql://...``: workers on several machines share one queue). The schema is created and
upgraded by Alembic (``migrations/``), never by hand: :func:`connect` brings a database to the newest revision.

Every public object has an OpenAI-style string id (``file-...``, ``ftjob-...``) and an integer ``seq`` that
orders it: cursor paging (``after=<id>``) reads the ``seq`` of that id and returns the rows before it.
"""

from __future__ import annotations

import secrets
import string
import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Engine, Float, ForeignKey, Index, Integer, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """``prefix-`` and ``n`` random letters and digits (as OpenAI's ids look)."""
    return f"{prefix}-{''.join(secrets.choice(_ALPHABET) for _ in range(n))}"


def now() -> int:
    """Unix seconds, as OpenAI's ``created_at`` fields."""
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    """A key (``Authorization: Bearer pk-...``); only its SHA-256 is stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)  # one active key per name (store.add_key)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class File(Base):
    """An uploaded file, stored as ``<storage>/files/<id>.jsonl`` (the user's file name is never a path)."""

    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Job(Base):
    """A fine-tuning job. ``status``: validating_files, queued, running, pausing, paused, succeeded, failed,
    cancelled. ``worker`` and ``heartbeat_at`` belong to the worker running it; a job whose heartbeat is older
    than the lease is re-queued and resumes from its last checkpoint."""

    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {type, supervised: {hyperparameters}} as resolved
    peftkit: Mapped[dict[str, Any]] = mapped_column(JSON)  # peftkit's own settings (method, overrides)
    status: Mapped[str] = mapped_column(String(24), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(400), default=None)
    model_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    worker: Mapped[str | None] = mapped_column(String(80), default=None)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Event(Base):
    """One line of a job's log (``fine_tuning.job.event``); ``step`` makes a metrics event unique per job, so a
    resumed job that logs a step again adds nothing."""

    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    __table_args__ = (Index("ix_events_job_step", "job_id", "type", "step", unique=True),)


class Checkpoint(Base):
    """A checkpoint a job wrote (``fine_tuning.job.checkpoint``), callable as ``<fine-tuned model>:ckpt-step-N``."""

    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step", unique=True),)


def database_url(storage: Path, url: str | None) -> str:
    """``url``, or the default SQLite file in the storage folder. ``postgresql://`` uses psycopg 3."""
    if not url:
        return f"sqlite:///{(Path(storage) / 'peftkit.db').resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def connect(storage: Path, url: str | None = None) -> sessionmaker:
    """A session factory on the service's database, migrated to the newest schema first."""
    engine = make_engine(database_url(storage, url))
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # several processes (server, workers, job children) write one file: wait for the lock, don't fail
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the database to Alembic's head revision (creates the tables on a new database)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # several processes may start at once: one migrates, the others wait
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_xact_lock(7270211)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
