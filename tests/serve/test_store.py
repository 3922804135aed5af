"""Unit tests of :mod:`peftkit.serve.store` on a real (SQLite) database made by :func:`peftkit.serve.db.connect`:
keys, cursor paging, files per key, the job status rules, the queue (claim, stale leases, heartbeats), events and
checkpoints; and many threads claiming from one queue."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from peftkit.errors import PeftkitError
from peftkit.serve import store
from peftkit.serve.db import ApiKey, Checkpoint, Event, File, Job, connect, new_id, now
from peftkit.serve.store import Conflict, NotFound

METHOD = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                     "learning_rate_multiplier": 1.0}}}
PEFTKIT = {"method": {"name": "lora"}, "settings": {}}
LEASE = 60.0


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database migrated once; each test copies it (the migration takes most of a second)."""
    folder = tmp_path_factory.mktemp("migrated")
    connect(folder).kw["bind"].dispose()
    return folder / "peftkit.db"


@pytest.fixture
def sessions(migrated: Path, tmp_path: Path) -> Iterator[sessionmaker]:
    shutil.copy(migrated, tmp_path / "peftkit.db")
    factory = connect(tmp_path)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def s(sessions: sessionmaker) -> Iterator[Session]:
    with sessions() as session:
        yield session


def owner(s: Session, name: str) -> str:
    """A key's id (what rows are owned by)."""
    return store.key_for(s, store.add_key(s, name)).id


def add_job(s: Session, who: str, status: str = "queued", training_file: str = "file-t", **fields: Any) -> Job:
    job = Job(id=new_id("ftjob"), owner=who, model="tiny", training_file=training_file, seed=1, method=METHOD,
              peftkit=PEFTKIT, status=status, created_at=now(), **fields)
    s.add(job)
    s.commit()
    return job


def add_file_row(s: Session, who: str, name: str = "f.jsonl") -> File:
    row = File(id=new_id("file"), owner=who, filename=name, purpose="fine-tune", bytes=10, lines=1, created_at=now())
    s.add(row)
    s.commit()
    return row


def events(s: Session, job_id: str) -> list[tuple[str, str]]:
    return [(e.level, e.message) for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))]


def fresh(s: Session, job_id: str) -> Job:
    s.expire_all()
    return store.get_job(s, None, job_id)


# -- keys ------------------------------------------------------------------------------------------------
def test_a_key_is_returned_once_and_only_its_digest_kept(s):
    key = store.add_key(s, "alice")
    assert key.startswith("pk-") and len(key) > 40
    row = store.key_for(s, key)
    assert row is not None and row.name == "alice" and row.id.startswith("key-") and row.revoked_at is None
    assert row.digest == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {row.id, row.name, row.digest}


def test_key_for_a_wrong_or_revoked_key_is_none(s):
    alice, bob = store.add_key(s, "alice"), store.add_key(s, "bob")
    assert alice != bob
    assert store.key_for(s, "pk-wrong") is None and store.key_for(s, "") is None
    store.revoke_key(s, "alice")
    assert store.key_for(s, alice) is None
    assert store.key_for(s, bob).name == "bob"
    assert [(k.name, k.revoked_at is not None) for k in store.list_keys(s)] in (
        [("alice", True), ("bob", False)], [("bob", False), ("alice", True)])


def test_revoking_an_unknown_or_revoked_key_is_not_found(s):
    store.add_key(s, "alice")
    store.revoke_key(s, "alice")
    with pytest.raises(NotFound, match="^no active key named 'alice'$"):
        store.revoke_key(s, "alice")
    with pytest.raises(NotFound, match="^no active key named 'carol'$"):
        store.revoke_key(s, "carol")


@pytest.mark.parametrize("name", ["a", "x" * 64, "ci-bot_2.prod", "ALICE"])
def test_good_key_names(s, name):
    store.add_key(s, name)
    assert [k.name for k in store.list_keys(s)] == [name]


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "a:b", "a@b", "tab\t"])
def test_bad_key_names(s, name):
    with pytest.raises(PeftkitError) as info:
        store.add_key(s, name)
    assert type(info.value) is PeftkitError
    assert str(info.value) == f"key name {name[:80]!r}: use 1-64 letters, digits, '-', '_' or '.'"
    assert store.list_keys(s) == []


def test_a_name_in_use_is_a_conflict(s):
    store.add_key(s, "alice")
    with pytest.raises(Conflict, match=r"^a key named 'alice' exists \(revoke it first, or choose another name\)$"):
        store.add_key(s, "alice")
    assert len(store.list_keys(s)) == 1


def test_a_revoked_keys_name_can_be_used_again(s):
    store.add_key(s, "alice")
    store.revoke_key(s, "alice")
    key = store.add_key(s, "alice")
    assert store.key_for(s, key).name == "alice"


# -- page ------------------------------------------------------------------------------------------------
@pytest.fixture
def five_files(s) -> tuple[str, list[str]]:
    alice, bob = owner(s, "alice"), owner(s, "bob")
    ids = []
    for i in range(5):
        ids.append(add_file_row(s, alice, f"a{i}").id)
        add_file_row(s, bob, f"b{i}")  # interleaved: another key's files are never in alice's pages
    return alice, ids


def test_page_newest_first(s, five_files):
    alice, ids = five_files
    where = [File.owner == alice]
    rows, more = store.page(s, File, where, None, 2)
    assert ([r.id for r in rows], more) == ([ids[4], ids[3]], True)
    rows, more = store.page(s, File, where, ids[3], 2)
    assert ([r.id for r in rows], more) == ([ids[2], ids[1]], True)
    rows, more = store.page(s, File, where, ids[1], 2)
    assert ([r.id for r in rows], more) == ([ids[0]], False)
    rows, more = store.page(s, File, where, ids[0], 2)
    assert (rows, more) == ([], False)


def test_page_oldest_first(s, five_files):
    alice, ids = five_files
    where = [File.owner == alice]
    rows, more = store.page(s, File, where, None, 2, newest_first=False)
    assert ([r.id for r in rows], more) == ([ids[0], ids[1]], True)
    rows, more = store.page(s, File, where, ids[1], 2, newest_first=False)
    assert ([r.id for r in rows], more) == ([ids[2], ids[3]], True)
    rows, more = store.page(s, File, where, ids[3], 2, newest_first=False)
    assert ([r.id for r in rows], more) == ([ids[4]], False)


def test_a_page_that_ends_exactly_has_no_more(s, five_files):
    alice, ids = five_files
    rows, more = store.page(s, File, [File.owner == alice], ids[2], 2)
    assert ([r.id for r in rows], more) == ([ids[1], ids[0]], False)
    rows, more = store.page(s, File, [File.owner == alice], None, 5)
    assert ([r.id for r in rows], more) == (ids[::-1], False)


def test_page_after_an_unknown_id_is_not_found(s, five_files):
    alice, _ = five_files
    with pytest.raises(NotFound, match="^after: no file 'file-nope'$"):
        store.page(s, File, [File.owner == alice], "file-nope", 2)
    with pytest.raises(NotFound, match="^after: no job 'ftjob-nope'$"):
        store.page(s, Job, [Job.owner == alice], "ftjob-nope", 2)


def test_page_after_another_keys_id_is_not_found(s, five_files):
    alice, _ = five_files
    bobs = s.scalar(select(File.id).where(File.owner != alice).limit(1))
    with pytest.raises(NotFound, match=f"^after: no file '{bobs}'$"):
        store.page(s, File, [File.owner == alice], bobs, 2)


# -- files -----------------------------------------------------------------------------------------------
def test_add_file_writes_it_whole_under_its_id(s, tmp_path):
    alice = owner(s, "alice")
    row = store.add_file(s, alice, "x" * 300, "fine-tune", b'{"text": "a"}\n', 1, tmp_path)
    assert row.id.startswith("file-") and (row.bytes, row.lines, row.filename) == (14, 1, "x" * 256)
    assert store.file_path(tmp_path, row.id) == tmp_path / "files" / f"{row.id}.jsonl"
    assert store.file_path(tmp_path, row.id).read_bytes() == b'{"text": "a"}\n'
    assert not list((tmp_path / "files").glob("*.part"))
    assert store.get_file(s, alice, row.id).id == row.id


def test_another_keys_file_is_not_found(s, tmp_path):
    alice, bob = owner(s, "alice"), owner(s, "bob")
    row = store.add_file(s, alice, "a.jsonl", "fine-tune", b"{}\n", 1, tmp_path)
    with pytest.raises(NotFound, match=f"^No such File object: {row.id}$"):
        store.get_file(s, bob, row.id)
    with pytest.raises(NotFound, match=f"^No such File object: {row.id}$"):
        store.delete_file(s, bob, row.id, tmp_path)
    assert store.file_path(tmp_path, row.id).exists()
    assert store.get_file(s, alice, row.id).owner == alice


def test_delete_file_removes_the_row_and_the_bytes(s, tmp_path):
    alice = owner(s, "alice")
    row = store.add_file(s, alice, "a.jsonl", "fine-tune", b"{}\n", 1, tmp_path)
    store.delete_file(s, alice, row.id, tmp_path)
    assert not store.file_path(tmp_path, row.id).exists()
    with pytest.raises(NotFound):
        store.get_file(s, alice, row.id)
    with pytest.raises(NotFound):
        store.delete_file(s, alice, row.id, tmp_path)


@pytest.mark.parametrize("status", ["validating_files", "queued", "running", "pausing", "paused"])
@pytest.mark.parametrize("as_validation", [False, True])
def test_a_file_a_job_still_uses_cannot_be_deleted(s, tmp_path, status, as_validation):
    alice = owner(s, "alice")
    row = store.add_file(s, alice, "a.jsonl", "fine-tune", b"{}\n", 1, tmp_path)
    job = add_job(s, alice, status, "file-other", validation_file=row.id) if as_validation else \
        add_job(s, alice, status, row.id)
    with pytest.raises(Conflict, match=f"^file {row.id} is used by job {job.id}, which has not ended; cancel it "
                                       "first$"):
        store.delete_file(s, alice, row.id, tmp_path)
    assert store.file_path(tmp_path, row.id).exists() and store.get_file(s, alice, row.id)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_file_whose_jobs_ended_can_be_deleted(s, tmp_path, status):
    alice = owner(s, "alice")
    row = store.add_file(s, alice, "a.jsonl", "fine-tune", b"{}\n", 1, tmp_path)
    add_job(s, alice, status, row.id)
    store.delete_file(s, alice, row.id, tmp_path)
    assert not store.file_path(tmp_path, row.id).exists()


# -- job status rules ------------------------------------------------------------------------------------
def test_another_keys_job_is_not_found(s):
    alice, bob = owner(s, "alice"), owner(s, "bob")
    job = add_job(s, alice)
    for action in (store.cancel, store.pause, store.resume, store.get_job):
        with pytest.raises(NotFound, match=f"^No such fine-tuning job: {job.id}$"):
            action(s, bob, job.id)
    assert store.get_job(s, None, job.id).status == "queued"  # None: any owner (the workers)


@pytest.mark.parametrize("status", ["validating_files", "queued", "running", "pausing", "paused"])
def test_a_job_that_has_not_ended_can_be_cancelled(s, status):
    alice = owner(s, "alice")
    job = add_job(s, alice, status)
    before = now()
    store.cancel(s, alice, job.id)
    row = fresh(s, job.id)
    assert row.status == "cancelled" and row.finished_at >= before
    assert events(s, job.id) == [("info", "Job cancelled")]


@pytest.mark.parametrize(("status", "said"), [("succeeded", "already succeeded"), ("failed", "already failed"),
                                              ("cancelled", "already been cancelled")])
def test_a_job_that_ended_cannot_be_cancelled(s, status, said):
    alice = owner(s, "alice")
    job = add_job(s, alice, status, finished_at=123)
    with pytest.raises(Conflict, match=f"^Job {job.id} has {said}$"):
        store.cancel(s, alice, job.id)
    row = fresh(s, job.id)
    assert (row.status, row.finished_at, events(s, job.id)) == (status, 123, [])


@pytest.mark.parametrize(("status", "then", "message"), [
    ("queued", "paused", "Job paused"), ("validating_files", "paused", "Job paused"),
    ("running", "pausing", "Job pausing"), ("pausing", "pausing", None), ("paused", "paused", None),
])
def test_pause(s, status, then, message):
    alice = owner(s, "alice")
    job = add_job(s, alice, status)
    assert store.pause(s, alice, job.id).status == then
    assert fresh(s, job.id).status == then and fresh(s, job.id).finished_at is None
    assert events(s, job.id) == ([("info", message)] if message else [])  # pausing twice changes nothing


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_job_that_ended_cannot_be_paused(s, status):
    alice = owner(s, "alice")
    job = add_job(s, alice, status)
    with pytest.raises(Conflict, match=f"^Job {job.id} has {status}; only a job that has not ended can be paused$"):
        store.pause(s, alice, job.id)
    assert fresh(s, job.id).status == status


def test_resume_queues_a_paused_job(s):
    alice = owner(s, "alice")
    job = add_job(s, alice, "paused")
    assert store.resume(s, alice, job.id).status == "queued"
    assert fresh(s, job.id).status == "queued"
    assert events(s, job.id) == [("info", "Job resumed: queued to continue from its last checkpoint")]


@pytest.mark.parametrize("status", ["validating_files", "queued", "running", "pausing", "succeeded", "failed",
                                    "cancelled"])
def test_only_a_paused_job_can_be_resumed(s, status):
    alice = owner(s, "alice")
    job = add_job(s, alice, status)
    with pytest.raises(Conflict, match=f"^Job {job.id} is {status}; only a paused job can be resumed$"):
        store.resume(s, alice, job.id)
    assert fresh(s, job.id).status == status and events(s, job.id) == []


def test_set_status_to_an_end_sets_finished_at_once(s):
    alice = owner(s, "alice")
    job = add_job(s, alice, "running", finished_at=None)
    store.set_status(s, job, "failed", "boom", level="error", error={"code": "x"})
    row = fresh(s, job.id)
    assert (row.status, row.error, row.finished_at is not None) == ("failed", {"code": "x"}, True)
    assert events(s, job.id) == [("error", "boom")]


# -- claim, stale leases, heartbeats ---------------------------------------------------------------------
def test_claim_takes_the_oldest_queued_job_once(s):
    alice = owner(s, "alice")
    first = add_job(s, alice, "queued")
    add_job(s, alice, "running", worker="w0", heartbeat_at=time.time())
    add_job(s, alice, "paused")
    add_job(s, alice, "validating_files")
    second = add_job(s, alice, "queued")
    add_job(s, alice, "succeeded")
    before = time.time()
    a = store.claim(s, "w1", LEASE)
    assert (a.id, a.status, a.worker, a.attempts) == (first.id, "running", "w1", 1)
    assert a.heartbeat_at >= before
    b = store.claim(s, "w2", LEASE)
    assert (b.id, b.worker) == (second.id, "w2")
    assert store.claim(s, "w3", LEASE) is None
    assert fresh(s, first.id).worker == "w1" and fresh(s, second.id).worker == "w2"


def test_claim_on_an_empty_queue_is_none(s):
    assert store.claim(s, "w1", LEASE) is None


@pytest.mark.parametrize("age", [LEASE + 5, None])
def test_a_running_job_whose_heartbeat_is_older_than_the_lease_is_queued_again(s, age):
    alice = owner(s, "alice")
    job = add_job(s, alice, "running", worker="host:1", attempts=1,
                  heartbeat_at=None if age is None else time.time() - age)
    got = store.claim(s, "w2", LEASE)
    assert (got.id, got.status, got.worker, got.attempts) == (job.id, "running", "w2", 2)
    [(level, message)] = events(s, job.id)
    assert level == "warn" and message.startswith("Worker ")
    assert message.endswith(" stopped responding; the job is queued again and resumes from its last checkpoint")


def test_a_fresh_running_job_is_left_to_its_worker(s):
    alice = owner(s, "alice")
    job = add_job(s, alice, "running", worker="host:1", heartbeat_at=time.time() - LEASE + 5)
    assert store.requeue_stale(s, LEASE) == []
    assert store.claim(s, "w2", LEASE) is None
    row = fresh(s, job.id)
    assert (row.status, row.worker) == ("running", "host:1") and events(s, job.id) == []


def test_a_running_job_whose_worker_is_dead_is_queued_again_at_once(s):
    alice = owner(s, "alice")
    dead = add_job(s, alice, "running", worker="host:dead", heartbeat_at=time.time())
    alive = add_job(s, alice, "running", worker="host:alive", heartbeat_at=time.time())
    asked: list[str | None] = []

    def is_dead(worker: str | None) -> bool:
        asked.append(worker)
        return worker == "host:dead"

    assert store.requeue_stale(s, LEASE, is_dead) == [dead.id]
    assert sorted(asked) == ["host:alive", "host:dead"]
    assert (fresh(s, dead.id).status, fresh(s, dead.id).worker) == ("queued", None)
    assert (fresh(s, alive.id).status, fresh(s, alive.id).worker) == ("running", "host:alive")
    assert store.claim(s, "w2", LEASE, is_dead).id == dead.id


def test_a_stale_pausing_job_becomes_paused_not_queued(s):
    alice = owner(s, "alice")
    job = add_job(s, alice, "pausing", worker="host:1", heartbeat_at=time.time() - LEASE - 1)
    assert store.claim(s, "w2", LEASE) is None
    row = fresh(s, job.id)
    assert (row.status, row.worker) == ("paused", None)
    [(level, message)] = events(s, job.id)
    assert level == "warn" and message.startswith("Worker ")
    assert message.endswith(" stopped responding; the job is paused; resuming continues from its last checkpoint")
    store.resume(s, alice, job.id)
    assert store.claim(s, "w2", LEASE).id == job.id


@pytest.mark.parametrize(("status", "rest"), [
    ("running", "the job is queued again and resumes from its last checkpoint"),
    ("pausing", "the job is paused; resuming continues from its last checkpoint"),
])
def test_the_requeue_event_names_the_worker_that_stopped(s, status, rest):
    alice = owner(s, "alice")
    job = add_job(s, alice, status, worker="host:1", heartbeat_at=time.time() - LEASE - 1)
    store.requeue_stale(s, LEASE)
    assert events(s, job.id) == [("warn", f"Worker host:1 stopped responding; {rest}")]


def test_heartbeat_refreshes_and_reports_the_status(s):
    alice = owner(s, "alice")
    add_job(s, alice)
    job = store.claim(s, "w1", LEASE)
    old = fresh(s, job.id).heartbeat_at
    time.sleep(0.01)
    assert store.heartbeat(s, job.id, "w1") == "running"
    assert fresh(s, job.id).heartbeat_at > old
    store.pause(s, alice, job.id)
    assert store.heartbeat(s, job.id, "w1") == "pausing"
    store.cancel(s, alice, job.id)
    assert store.heartbeat(s, job.id, "w1") == "cancelled"


def test_heartbeat_of_a_job_no_longer_the_workers_is_none(s):
    alice = owner(s, "alice")
    add_job(s, alice)
    job = store.claim(s, "w1", LEASE)
    assert store.heartbeat(s, job.id, "w2") is None
    assert store.heartbeat(s, "ftjob-nope", "w1") is None
    s.execute(Job.__table__.update().where(Job.id == job.id).values(heartbeat_at=time.time() - LEASE - 1))
    s.commit()
    s.expire_all()  # a Core update: the session's loaded row would still show the fresh heartbeat
    assert store.claim(s, "w2", LEASE).id == job.id  # the lease ran out: re-queued and taken by w2
    assert store.heartbeat(s, job.id, "w1") is None
    assert store.heartbeat(s, job.id, "w2") == "running"
    assert fresh(s, job.id).worker == "w2"


# -- events and checkpoints ------------------------------------------------------------------------------
def test_a_metrics_event_is_logged_once_per_step(s):
    alice = owner(s, "alice")
    job, other = add_job(s, alice), add_job(s, alice)
    assert store.add_event(s, job.id, "Step 3", type_="metrics", data={"step": 3}, step=3) is True
    assert store.add_event(s, job.id, "Step 3 again", type_="metrics", data={"step": 3}, step=3) is False
    assert store.add_event(s, job.id, "Step 4", type_="metrics", step=4) is True
    assert store.add_event(s, other.id, "Step 3", type_="metrics", step=3) is True  # per job
    assert store.add_event(s, job.id, "note", step=3) is True  # another type at the same step
    assert store.add_event(s, job.id, "hello") is True
    assert store.add_event(s, job.id, "hello") is True  # plain messages are never deduplicated
    assert [m for _, m in events(s, job.id)] == ["Step 3", "Step 4", "note", "hello", "hello"]
    row = s.scalar(select(Event).where(Event.job_id == job.id, Event.step == 3, Event.type == "metrics"))
    assert (row.data, row.level, row.id.startswith("ftevent-")) == ({"step": 3}, "info", True)


def test_checkpoints_once_per_step_and_dropped_when_gone(s):
    alice = owner(s, "alice")
    job, other = add_job(s, alice), add_job(s, alice)
    for step in (2, 4, 6, 8):
        assert store.add_checkpoint(s, job.id, step, {"step": step, "train_loss": 1.0 / step}) is True
    assert store.add_checkpoint(s, job.id, 4, {}) is False
    assert store.add_checkpoint(s, other.id, 4, {}) is True
    store.drop_checkpoints(s, job.id, {6, 8, 10})
    rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)))
    assert [(r.step, r.metrics["step"]) for r in rows] == [(6, 6), (8, 8)]
    assert s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == other.id)) == 1


def test_fine_tuned_models_are_the_owners_succeeded_undeleted_ones(s):
    alice, bob = owner(s, "alice"), owner(s, "bob")
    a = add_job(s, alice, "succeeded", fine_tuned_model="ft:tiny::a")
    add_job(s, alice, "succeeded", fine_tuned_model="ft:tiny::b", model_deleted=True)
    add_job(s, alice, "failed", fine_tuned_model="ft:tiny::c")
    c = add_job(s, alice, "succeeded", fine_tuned_model="ft:tiny::d")
    add_job(s, bob, "succeeded", fine_tuned_model="ft:tiny::e")
    assert [j.id for j in store.fine_tuned_models(s, alice)] == [a.id, c.id]


# -- many workers on one SQLite file ---------------------------------------------------------------------
def test_concurrent_claims_never_hand_one_job_to_two_workers(tmp_path: Path):
    sessions = connect(tmp_path)
    try:
        with sessions() as s:
            alice = owner(s, "alice")
            ids = [add_job(s, alice).id for _ in range(20)]
        claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(4)}
        failures: list[BaseException] = []
        start = threading.Barrier(4)

        def work(name: str) -> None:
            try:
                with sessions() as s:
                    start.wait()
                    while (job := store.claim(s, name, LEASE)) is not None:
                        claimed[name].append(job.id)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failures.append(e)

        threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures, failures
        assert not any(t.is_alive() for t in threads)
        every = [j for got in claimed.values() for j in got]
        assert sorted(every) == sorted(ids)  # each job exactly once
        with sessions() as s:
            rows = {j.id: j for j in s.scalars(select(Job))}
        for name, got in claimed.items():
            assert got == sorted(got, key=lambda j: rows[j].seq)  # each worker took them oldest first
            assert all(rows[j].worker == name and rows[j].status == "running" and rows[j].attempts == 1 for j in got)
    finally:
        sessions.kw["bind"].dispose()


def test_api_key_rows_hold_no_secret(s):
    key = store.add_key(s, "alice")
    (row,) = s.scalars(select(ApiKey))
    assert key not in repr(vars(row))
