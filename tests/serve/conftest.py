"""A real ``peftkit serve`` (uvicorn + worker processes) on 127.0.0.1 for the tests, driven by the official
``openai`` client; SQLite by default, PostgreSQL through the ``postgres_url`` fixture."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

#: timings short enough for a test: a dead worker's job is re-queued after LEASE seconds
POLL, LEASE = 0.3, 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peftkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=120)
    assert not check or r.returncode == 0, r.stderr[-2000:]
    return r


@dataclass
class Service:
    """One service: its storage, database and bases; :meth:`start` runs the server (and its workers)."""

    storage: Path
    base: Path
    database: str | None = None
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def place(self) -> list[str]:
        return ["--storage", str(self.storage)] + (["--database", self.database] if self.database else [])

    def work(self) -> list[str]:
        return ["--model", f"tiny={self.base}", "--poll", str(POLL), "--lease", str(LEASE)]

    def add_key(self, name: str) -> str:
        return peftkit("serve", "keys", "add", name, *self.place()).stdout.strip().splitlines()[-1]

    def start(self, workers: int = 1) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_TENSORBOARD": "0"}
        log = open(self.storage / f"server-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, "-m", "peftkit", "serve", *self.place(), *self.work(),
                              "--port", str(self.port), "--workers", str(workers)], stdout=log, stderr=log, env=env)
        self.procs.append(p)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert p.poll() is None, (self.storage / f"server-{len(self.procs) - 1}.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 401:
                    return p
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not start")

    def start_worker(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_TENSORBOARD": "0"}
        log = open(self.storage / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "peftkit", "worker", *self.place(), *self.work()], stdout=log,
                             stderr=log, env=env)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def service(tmp_path: Path, tiny_lm_dir: Path) -> Iterator[Service]:
    """A service of this test's own (not started: add keys, then :meth:`Service.start`)."""
    svc = Service(tmp_path / "storage", tiny_lm_dir)
    svc.storage.mkdir()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def idle_service(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Iterator[Service]:
    """A running service without workers, shared by a module's tests (each makes its own keys): jobs are
    created, checked and queued, never run."""
    svc = Service(tmp_path_factory.mktemp("idle") / "storage", tiny_lm_dir)
    svc.storage.mkdir()
    svc.start(workers=0)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def busy_service(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Iterator[Service]:
    """A running service with one worker, shared by a module's tests."""
    svc = Service(tmp_path_factory.mktemp("busy") / "storage", tiny_lm_dir)
    svc.storage.mkdir()
    svc.start(workers=1)
    yield svc
    svc.stop()


def chat_jsonl(n: int = 24, seed: int = 0) -> bytes:
    """``n`` chat examples in OpenAI's format (a colour question and its answer)."""
    pairs = [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"), ("blood", "red")]
    lines = []
    for i in range(n):
        thing, colour = pairs[(i + seed) % len(pairs)]
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": f"What colour is {thing}? ({i})"},
            {"role": "assistant", "content": colour}]}))
    return ("\n".join(lines) + "\n").encode()


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s (wanted {statuses})")


# -- PostgreSQL ---------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server (Debian's ``postgresql`` package; scripts/setup.sh installs it) on a free
    port; yields its base URL. Skipped, saying why, where the server is not installed or cannot start."""
    import shutil

    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql; scripts/setup.sh does it as root)")
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="peftkit-pg-"))  # not under pytest's 0700 folder: the server's user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("PostgreSQL: running as root without runuser to switch to the postgres user")
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    r = subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "peftkit", "-A", "trust"],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"PostgreSQL: initdb failed: {r.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", opts, "-l",
                        str(data / "log"), "-w", "start"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"PostgreSQL: the server did not start: {(data / 'log').read_text()[-300:]}")
    try:
        yield f"postgresql://peftkit@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the test server."""
    import psycopg

    name = f"t{os.urandom(6).hex()}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_service(request, tmp_path: Path, tiny_lm_dir: Path) -> Iterator[Service]:
    """The service on SQLite, then on PostgreSQL."""
    database = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    svc = Service(tmp_path / "storage", tiny_lm_dir, database)
    svc.storage.mkdir()
    yield svc
    svc.stop()
