"""How one service is set up: where its files and runs live, its database, the bases a job may name."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.errors import ConfigError


@dataclass
class ServeSettings:
    """Attributes:
        storage: the folder for uploaded files, job run folders and the default SQLite database (a shared file
            system when workers run on several machines).
        database: a SQLAlchemy URL (``postgresql://user@host/db``); None: ``STORAGE/peftkit.db`` (SQLite).
        models: bases a job may name besides the built-in aliases: ``name -> local model folder``.
        max_upload_bytes: uploads larger than this are refused (413).
        lease_s: a job whose worker has not heart-beaten for this long is queued again (resumes from its checkpoint).
        poll_s: how often a worker looks for work and heart-beats.
    """

    storage: Path
    database: str | None = None
    models: dict[str, str] = field(default_factory=dict)
    max_upload_bytes: int = 512 * 2**20
    lease_s: float = 60.0
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        self.storage = Path(self.storage).expanduser().resolve()
        if self.lease_s <= 3 * self.poll_s:
            raise ConfigError(f"--lease ({self.lease_s} s) must be more than three polls ({self.poll_s} s each)")

    def base_path(self, name: str) -> str:
        """The model folder or built-in alias a job's ``model`` names.

        Raises:
            ConfigError: neither a registered name nor a built-in alias.
        """
        from peftkit.models.builtin import list_builtin_models

        if name in self.models:
            return self.models[name]
        if name in list_builtin_models():
            return name
        known = ", ".join([*list_builtin_models(), *self.models])
        raise ConfigError(f"model {name!r} does not exist or you do not have access to it (bases: {known})")

    def bases(self) -> list[str]:
        from peftkit.models.builtin import list_builtin_models

        return [*list_builtin_models(), *self.models]


def parse_models(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items (``--model``), each PATH a model folder with a config.json."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=PATH")
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(f"--model {name}={path}: not a model folder (no config.json)")
        out[name] = str(Path(path).expanduser().resolve())
    return out


def worker_name() -> str:
    """``host:pid``: unique while the process lives; a dead pid on this host frees its job at once."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(name: str | None) -> bool:
    """Whether ``name`` (:func:`worker_name`) is a process of this host that no longer runs."""
    host, _, pid = (name or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
