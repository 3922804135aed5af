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
    odd = client.fine_tuning.jobs.list(limit=4, metadata={"n": "1"})  # sent as metadata[n]=1
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


def test_a_job_whose_training_fails_or_is_killed_fails_alone(busy_service):
    """A user error in training fails the job with its one-line reason; the job's process killed (as the
    out-of-memory killer does) fails the job with code out_of_memory; the worker goes on to the next job."""
    import os
    import signal
    import subprocess
    import time

    service = busy_service
    client = _client(service, service.add_key("carol"))
    f = client.files.create(file=("c.jsonl", io.BytesIO(chat_jsonl(120))), purpose="fine-tune")
    bad = client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                         extra_body={"peftkit": {"settings": {"train.lr": 1.0e30}}})
    failed = wait_for(client, bad.id, ("succeeded", "failed"))
    assert failed.status == "failed" and failed.error.code == "training_failed", failed.error
    assert " became " in failed.error.message and "at step" in failed.error.message  # the run's own one-line reason
    assert f"Job failed: {failed.error.message}" in [e.message for e in client.fine_tuning.jobs.list_events(bad.id)]
    one_epoch = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}
    doomed = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=one_epoch)
    run = service.storage / "jobs" / doomed.id / "run"
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker = int([e.message for e in client.fine_tuning.jobs.list_events(doomed.id, limit=50)
                  if " on worker " in e.message][0].rsplit(":", 1)[1])
    child = int(subprocess.run(["pgrep", "-P", str(worker)], capture_output=True, text=True).stdout.split()[0])
    os.kill(child, signal.SIGKILL)
    killed = wait_for(client, doomed.id, ("succeeded", "failed"))
    assert killed.status == "failed" and killed.error.code == "out_of_memory", killed.error
    after = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=one_epoch)
    assert wait_for(client, after.id, ("succeeded", "failed")).status == "succeeded"  # the same worker, still there


def test_limits_and_percent_encoded_model_ids(tmp_path, tiny_lm_dir):
    """Uploads over --max-upload-mb are 413; a base registered with a '/' in its name is found although the
    client percent-encodes the '/'."""
    from tests.serve.conftest import Service

    service = Service(tmp_path / "storage", tiny_lm_dir)
    service.storage.mkdir()
    key = service.add_key("dave")
    service.work = lambda: ["--model", f"org/tiny={tiny_lm_dir}", "--max-upload-mb", "0.001"]  # type: ignore[method-assign]
    service.start(workers=0)
    try:
        client = _client(service, key)
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.jsonl", io.BytesIO(chat_jsonl(40))), purpose="fine-tune")
        assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
        assert client.models.retrieve("org/tiny").id == "org/tiny"
        with pytest.raises(openai.PermissionDeniedError):
            client.models.delete("org/tiny")
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("ft:org/tiny::ftjob-nope")
    finally:
        service.stop()


def test_a_dpo_job_on_openai_preference_data(busy_service):
    """``method: {type: "dpo", dpo: {hyperparameters: {beta}}}`` as OpenAI's API takes it, on OpenAI's preference
    JSONL; the job trains with peftkit's DPO objective. A supervised job on pairs fails validation, naming why."""
    service = busy_service
    client = _client(service, service.add_key("erin"))
    rows = [{"input": {"messages": [{"role": "user", "content": f"What colour is {t}? ({i})"}]},
             "preferred_output": [{"role": "assistant", "content": c}],
             "non_preferred_output": [{"role": "assistant", "content": "purple"}]}
            for i, (t, c) in enumerate([("grass", "green"), ("snow", "white"), ("coal", "black")] * 4)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("prefs.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    config = (service.storage / "jobs" / job.id / "config.yaml").read_text()
    assert "objective: dpo" in config and "beta: 0.2" in config
    metrics = [json.loads(line) for line in (service.storage / "jobs" / job.id / "run" / "metrics.jsonl").open()]
    assert any("rewards/margins" in m for m in metrics)
    wrong = client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    failed = wait_for(client, wrong.id, ("failed", "queued", "running", "succeeded"))
    assert failed.status == "failed" and "a supervised job trains on examples with answers" in failed.error.message
