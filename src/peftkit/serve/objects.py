"""The service's rows as OpenAI's objects (the fields the ``openai`` client reads), and the two steps of a new
job that need more than one table: creating it and validating its files against the base's tokenizer."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from peftkit.errors import PeftkitError
from peftkit.serve import store
from peftkit.serve.db import ApiKey, Checkpoint, Event, File, Job, new_id, now
from peftkit.serve.jobs import JobSpec, RequestError
from peftkit.serve.settings import ServeSettings


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def file_object(row: File) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def job_object(row: Job) -> dict[str, Any]:
    hyper = row.method[row.method["type"]]["hyperparameters"]
    return {
        "id": row.id, "object": "fine_tuning.job", "created_at": row.created_at, "error": row.error,
        "fine_tuned_model": row.fine_tuned_model, "finished_at": row.finished_at, "hyperparameters": hyper,
        "model": row.model, "organization_id": "peftkit", "result_files": [], "seed": row.seed,
        "status": row.status, "trained_tokens": row.trained_tokens, "training_file": row.training_file,
        "validation_file": row.validation_file, "metadata": row.meta, "method": row.method,
        "suffix": row.suffix, "estimated_finish": None, "integrations": [],
        "peftkit": {**row.peftkit, "total_steps": row.total_steps},
    }


def event_object(row: Event) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.event", "created_at": row.created_at, "level": row.level,
            "message": row.message, "type": row.type, "data": row.data}


def checkpoint_object(row: Checkpoint, job: Job) -> dict[str, Any]:
    from peftkit.serve.jobs import fine_tuned_name

    name = f"{fine_tuned_name(job.model, job.suffix, job.id)}:ckpt-step-{row.step}"
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": row.created_at,
            "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job.id, "step_number": row.step,
            "metrics": row.metrics}


def base_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "peftkit"}


def model_object(job: Job, key: ApiKey) -> dict[str, Any]:
    return {"id": job.fine_tuned_model, "object": "model", "created": job.finished_at or job.created_at,
            "owned_by": key.name}


def own_model(s: Session, key: ApiKey, model: str) -> Job:
    """The job that made fine-tuned ``model`` for ``key`` (404 for anyone else, or once deleted)."""
    job = s.scalar(select(Job).where(Job.fine_tuned_model == model, Job.owner == key.id,
                                     Job.model_deleted.is_(False)))
    if job is None:
        raise store.NotFound(f"The model '{model}' does not exist or you do not have access to it.")
    return job


def new_job(s: Session, key: ApiKey, settings: ServeSettings, spec: JobSpec) -> Job:
    """Store a checked request as a job in ``validating_files`` ("auto" values resolved on the file's size)."""
    try:
        settings.base_path(spec.model)
    except PeftkitError as e:
        raise RequestError(str(e), "model", "model_not_found") from None
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(spec, param)
        if file_id is None:
            continue
        row = s.scalar(select(File).where(File.id == file_id, File.owner == key.id))
        if row is None:
            raise RequestError(f"invalid {param}: no file {file_id!r}", param, "invalid_file")
        files[param] = row
    hyper = spec.resolve(files["training_file"].lines)
    job = Job(id=new_id("ftjob"), owner=key.id, model=spec.model, training_file=spec.training_file,
              validation_file=spec.validation_file, suffix=spec.suffix, seed=spec.seed, meta=spec.metadata,
              method={"type": spec.kind, spec.kind: {"hyperparameters": hyper}},
              peftkit={"method": spec.method, "settings": spec.settings}, status="validating_files",
              created_at=now())
    s.add(job)
    s.flush()
    store.add_event(s, job.id, f"Created fine-tuning job: {job.id}", commit=False)
    store.add_event(s, job.id, "Validating training file: " + spec.training_file, commit=False)
    s.commit()
    return job


def validate_job(sessions: sessionmaker, settings: ServeSettings, job_id: str) -> None:
    """A new job's files read with its base's tokenizer: an example longer than the model reads fails the job
    (naming every such line); otherwise it is queued (with its total steps) for a worker."""
    with sessions() as s:
        job = store.get_job(s, None, job_id)
        if job.status != "validating_files":
            return
        try:
            message, steps = _check_files(s, settings, job)
        except (PeftkitError, OSError, ValueError) as e:
            message, steps = f"cannot validate: {str(e).splitlines()[0][:500]}", 0
        s.refresh(job)
        if job.status != "validating_files":  # cancelled or paused meanwhile
            return
        if message:
            store.set_status(s, job, "failed", f"Validation failed: {message}", level="error",
                             error={"code": "invalid_training_file", "message": message, "param": "training_file"})
        else:
            store.set_status(s, job, "queued", f"Files validated; job queued ({steps} steps)", total_steps=steps)


def _check_files(s: Session, settings: ServeSettings, job: Job) -> tuple[str, int]:
    from peftkit.core.config import from_dict
    from peftkit.data.template import Template
    from peftkit.runs.config import RunConfig
    from peftkit.serve.jobs import run_config
    from peftkit.serve.validate import Checked, check_lengths, check_lines

    tokenizer, context = _tokenizer(settings.base_path(job.model))
    examples = store.get_file(s, job.owner, job.training_file).lines
    cfg = from_dict(RunConfig, run_config(job, settings.storage, settings.base_path(job.model), examples))
    for param in ("training_file", "validation_file"):
        file_id = getattr(job, param)
        if file_id is None:
            continue
        checked = check_lines(store.file_path(settings.storage, file_id).read_bytes())
        pairs = job.method["type"] == "dpo"
        if (checked.format == "preference") != pairs:
            return (f"{param.replace('_', ' ')} holds {checked.format} examples; a {job.method['type']} job trains on "
                    f"{'preference pairs' if pairs else 'examples with answers (chat, prompt/completion, alpaca)'}"), 0
        template = Template.create(tokenizer, cfg.data.template, checked.format or "chat")
        too_long, truncated = check_lengths(checked.rows, template, context, cfg.data.max_length, checked.lines)
        if too_long:
            return Checked([], None, too_long).summary(param.replace("_", " ")), 0
        if truncated:
            store.add_event(s, job.id, f"{param}: {truncated} example(s) longer than data.max_length="
                            f"{cfg.data.max_length} tokens are truncated", level="warn", commit=False)
    return "", cfg.train.max_steps


def warm_up() -> None:
    """Import what checking a job's files needs (transformers' tokenizers, the method registry: ~5 s), so that
    the first job is not the one that waits for it."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import peftkit.core.registry  # noqa: F401
    import peftkit.data.template  # noqa: F401


@functools.lru_cache(maxsize=8)
def _tokenizer(base: str) -> tuple[Any, int]:
    """The base's tokenizer and how many positions the model reads (kept for the next job on this base)."""
    from transformers import AutoConfig, AutoTokenizer

    from peftkit.models.builtin import resolve_model

    path = resolve_model(base)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 10**9)
    return AutoTokenizer.from_pretrained(path, local_files_only=True), context
