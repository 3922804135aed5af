"""The service survives what kills processes: the server or a worker killed with SIGKILL mid-job, a job resumed
from its last checkpoint to the same adapter as an uninterrupted one; two workers on one queue never run a job
twice; cancel and pause stop a job after a checkpoint. On SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import io
import os
import signal
import time

import openai
import torch
from safetensors.torch import load_file

from tests.serve.conftest import Service, chat_jsonl, wait_for

#: 1 epoch of 80 steps (batch 2), a checkpoint every 8: long enough to be killed in the middle
LONG = dict(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
            seed=3, extra_body={"peftkit": {"method": {"name": "lora", "r": 4}}})
EXAMPLES = 160


def _client(service: Service, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url, api_key=key, max_retries=3)


def _adapter(service: Service, job_id: str) -> dict[str, torch.Tensor]:
    return load_file(service.storage / "jobs" / job_id / "run" / "adapter" / "adapter_model.safetensors")


def _first_checkpoint(service: Service, job_id: str, timeout: float = 180) -> int:
    """Wait (on the file system: quicker than the API) until the job's run wrote its first checkpoint."""
    folder = service.storage / "jobs" / job_id / "run" / "checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name[5:]) for p in folder.glob("step-*")] if folder.is_dir() else []
        if steps:
            return min(steps)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {job_id} after {timeout} s")


def _messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _reference(client: openai.OpenAI, file_id: str) -> str:
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, **LONG)
    assert wait_for(client, job.id, ("succeeded", "failed")).status == "succeeded"
    return job.id


def _holder(client: openai.OpenAI, job_id: str) -> int:
    """The pid of the worker that started the job last."""
    started = [m for m in _messages(client, job_id) if " on worker " in m]
    return int(started[-1].rsplit(":", 1)[1])


def test_killed_server_or_worker_resume_to_the_same_adapter(any_service):
    """kill -9 the server (its worker and the job's process die with it), restart: the job resumes from its last
    checkpoint; then, with two workers on one queue, kill -9 the worker holding a second job: the other resumes
    it. Both end with the adapter of an uninterrupted job, and no job runs twice."""
    svc = any_service
    key = svc.add_key("alice")
    server = svc.start()
    client = _client(svc, key)
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(EXAMPLES))), purpose="fine-tune")
    reference = _reference(client, f.id)

    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **LONG)
    _first_checkpoint(svc, job.id)
    server.send_signal(signal.SIGKILL)
    server.wait()
    svc.start()
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    messages = _messages(client, job.id)
    assert any("stopped responding" in m for m in messages), messages
    assert any(m.startswith("Fine-tuning job resumed from step") for m in messages), messages
    _same(_adapter(svc, job.id), _adapter(svc, reference))

    second = svc.start_worker()  # two workers on one queue now: the server's and this one
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **LONG)
    short = {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}}}
    others = [client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **short).id for _ in range(3)]
    _first_checkpoint(svc, job.id)
    holder = _holder(client, job.id)
    os.kill(holder, signal.SIGKILL)  # the worker holding the long job, while the other works through the queue
    if holder == second.pid:
        second.wait()
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert _holder(client, job.id) != holder
    assert sum(" on worker " in m for m in _messages(client, job.id)) == 2
    _same(_adapter(svc, job.id), _adapter(svc, reference))
    for other in others:  # two workers, one queue: each job started exactly once
        assert wait_for(client, other, ("succeeded", "failed")).status == "succeeded"
        assert sum(" on worker " in m for m in _messages(client, other)) == 1


def test_pause_resume_and_cancel_stop_after_a_checkpoint(service):
    key = service.add_key("alice")
    service.start()
    client = _client(service, key)
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(EXAMPLES))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **LONG)
    _first_checkpoint(service, job.id)
    assert client.fine_tuning.jobs.pause(job.id).status == "pausing"
    paused = wait_for(client, job.id, ("paused",))
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert paused.finished_at is None and max(steps) < 80  # stopped early, after writing a checkpoint
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert wait_for(client, job.id, ("succeeded", "failed")).status == "succeeded"
    assert f"Fine-tuning job resumed from step {max(steps)}" in " ".join(_messages(client, job.id))

    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, **LONG)
    first = _first_checkpoint(service, job.id)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    deadline = time.monotonic() + 60
    while "Job stopped after its last checkpoint" not in _messages(client, job.id):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    steps = sorted(int(p.name[5:]) for p in (service.storage / "jobs" / job.id / "run" / "checkpoints").glob("step-*"))
    assert steps[0] >= first and steps[-1] < 80  # a checkpoint of the step it stopped at, well before the end
    try:
        client.fine_tuning.jobs.cancel(job.id)
    except openai.BadRequestError as e:
        assert "already been cancelled" in e.body["message"]
    else:
        raise AssertionError("cancelling twice must be refused")
