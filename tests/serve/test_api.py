"""The service as the official ``openai`` client sees it: files, jobs, events, checkpoints, models, keys."""

from __future__ import annotations

import io
import json

import openai
import pytest
from safetensors.torch import load_file

from tests.serve.conftest import chat_jsonl, wait_for


def _client(service, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url, api_key=key, max_retries=0)


def test_fine_tune_through_the_openai_client(busy_service):
    service = busy_service
    key = service.add_key("alice")
    client = _client(service, key)
    f = client.files.create(file=("colours.jsonl", io.BytesIO(chat_jsonl(24))), purpose="fine-tune")
    assert (f.object, f.purpose, f.bytes, f.filename) == ("file", "fine-tune", len(chat_jsonl(24)), "colours.jsonl")
    assert client.files.retrieve(f.id).id == f.id and client.files.content(f.id).read() == chat_jsonl(24)
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=f.id, suffix="colours", seed=7, metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        extra_body={"peftkit": {"method": {"name": "lora", "r": 4, "target_modules": "all-linear"}}})
    assert job.status == "validating_files" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.learning_rate_multiplier == 1.0  # "auto" resolved
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:colours:{job.id}" and done.trained_tokens > 0
    assert done.finished_at >= done.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paging, 3 a page
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created fine-tuning job")
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    assert steps == list(range(1, 13))  # 24 examples / 4 x 2 epochs, every step logged
    assert all(e.data["train_loss"] > 0 for e in events if e.type == "metrics")
    assert any(m.startswith("Checkpoint written at step") for m in messages)

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and all(c.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{c.step_number}"
                         for c in ckpts)
    assert ckpts[0].step_number > ckpts[-1].step_number  # newest first

    models = {m.id: m for m in client.models.list()}
    assert "tiny" in models and models[done.fine_tuned_model].owned_by == "alice"
    assert client.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    adapter = service.storage / "jobs" / job.id / "run" / "adapter"
    assert load_file(adapter / "adapter_model.safetensors")  # an ordinary run folder, PEFT-format adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert client.models.delete(done.fine_tuned_model).deleted
    assert done.fine_tuned_model not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(done.fine_tuned_model)


def test_bad_uploads_get_openai_errors_naming_each_line(idle_service):
    service = idle_service
    key = service.add_key("bad_uploads_get_open")
    client = _client(service, key)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    lines = [good, "{not json", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps({"foo": 1}),
             json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), good]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == "invalid_file_format" and err["param"] == "file"
    assert err["message"].startswith("bad.jsonl has 4 malformed lines: line 2: malformed JSON")
    for text in ("line 3: messages[0]: role 'robot' does not exist", "line 4: cannot tell the data format",
                 "line 5: the last message must be the assistant's"):
        assert text in err["message"]
    with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
        client.files.create(file=("data.csv", io.BytesIO(b"a,b\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="fine-tune files only"):
        client.files.create(file=("a.jsonl", io.BytesIO(chat_jsonl(2))), purpose="assistants")
    assert client.files.list().data == []  # nothing of a refused upload is kept
    assert not list(service.storage.glob("files/*.part"))


def test_keys_see_only_their_own_files_jobs_and_models(idle_service):
    service = idle_service
    alice, bob = service.add_key("alice-2"), service.add_key("bob")
    a, b = _client(service, alice), _client(service, bob)
    f = a.files.create(file=("../../etc/x.jsonl", io.BytesIO(chat_jsonl(4))), purpose="fine-tune")
    assert (service.storage / "files" / f"{f.id}.jsonl").is_file()  # stored by id: the name never becomes a path
    job = a.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id), lambda: b.files.delete(f.id),
                 lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: b.fine_tuning.jobs.list_events(job.id), lambda: b.fine_tuning.jobs.checkpoints.list(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:  # bob cannot train on alice's file either
        b.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert e.value.body["param"] == "training_file"
    assert b.files.list().data == [] and b.fine_tuning.jobs.list().data == []
    assert [x.id for x in a.fine_tuning.jobs.list()] == [job.id]
    with pytest.raises(openai.AuthenticationError):
        _client(service, "pk-wrong").models.list()
    service_keys = service.place()
    from tests.serve.conftest import peftkit

    peftkit("serve", "keys", "revoke", "bob", *service_keys)
    with pytest.raises(openai.AuthenticationError):
        b.models.list()


def test_twenty_jobs_page_through_the_client(idle_service):
    service = idle_service
    key = service.add_key("twenty_jobs_page_thr")
    client = _client(service, key)
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(8))), purpose="fine-tune")
    made = [client.fine_tuning.jobs.create(model="tiny", training_file=f.id, metadata={"n": str(i % 2)}).id
            for i in range(20)]
    page = client.fine_tuning.jobs.list(limit=3)
    assert len(page.data) == 3 and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=3)] == made[::-1]  # auto-paging, newest first
    odd = client.fine_tuning.jobs.list(limit=4, extra_query={"metadata[n]": "1"})
    assert [j.id for j in odd] == made[1::2][::-1]
    with pytest.raises(openai.BadRequestError):  # a file a job still uses is kept
        client.files.delete(f.id)


def test_request_errors_name_the_field(idle_service):
    service = idle_service
    key = service.add_key("request_errors_name_")
    client = _client(service, key)
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(8))), purpose="fine-tune")
    cases = [
        (dict(model="nope", training_file=f.id), "model"),
        (dict(model="tiny", training_file="file-missing"), "training_file"),
        (dict(model="tiny", training_file=f.id, suffix="a/b"), "suffix"),
        (dict(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
        (dict(model="tiny", training_file=f.id, method={"type": "reinforcement"}), "method.type"),
        (dict(model="tiny", training_file=f.id, extra_body={"peftkit": {"method": {"name": "lorra"}}}), "peftkit.method"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    assert client.fine_tuning.jobs.list().data == []


def test_an_example_longer_than_the_model_fails_the_job_naming_the_line(idle_service):
    service = idle_service
    key = service.add_key("an_example_longer_th")
    client = _client(service, key)
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 700}, {"role": "assistant", "content": "ok"}]})
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(3) + long.encode() + b"\n")), purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=f.id).id, ("failed", "queued"))
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 4:" in job.error.message and "longer than the model reads (512)" in job.error.message
