"""``peftkit serve`` (the API and its workers), ``peftkit serve keys add|list|revoke``, ``peftkit worker``."""

from __future__ import annotations

import argparse
from typing import Any


def _add_place(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--storage", required=required, help="folder for uploaded files, job runs and the default SQLite database")
    p.add_argument("--database", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: STORAGE/peftkit.db)")


def _add_work(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a local model folder jobs may name as NAME (repeatable; built-in aliases always)")
    p.add_argument("--lease", type=float, default=60.0,
                   help="seconds without a worker's heartbeat before its job is queued again")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between a worker's looks at the queue")


def _serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible fine-tuning service (files, jobs, models)",
                       description="Serve OpenAI's files, fine_tuning.jobs and models endpoints at "
                                   "http://HOST:PORT/v1 with N workers; the `openai` client works unchanged. "
                                   "Make a key first: peftkit serve keys add NAME --storage DIR")
    _add_place(p, required=False)  # required to serve; `keys` takes its own
    _add_work(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="worker processes started with the server (0: none)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest file upload accepted, in MB")
    p.set_defaults(handler=run_serve)
    keys = p.add_subparsers(dest="serve_command", metavar="keys", help="manage API keys (peftkit serve keys --help)")
    k = keys.add_parser("keys", help="API keys: add, list, revoke").add_subparsers(
        dest="keys_command", required=True, help="what to do with keys")
    for name, text in (("add", "make a key (printed alone on the last line)"), ("list", "list keys"),
                       ("revoke", "revoke a key")):
        q = k.add_parser(name, help=text)
        if name != "list":
            q.add_argument("name", help="the key's name (its owner)")
        _add_place(q)
        q.set_defaults(handler=run_keys)


def _worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker for `peftkit serve` (more of them, or on other machines)",
                       description="Take fine-tuning jobs from the service's queue and run them, one at a time.")
    _add_place(p)
    _add_work(p)
    p.set_defaults(handler=run_worker)


def _settings(args: argparse.Namespace) -> Any:
    from peftkit.serve.settings import ServeSettings, parse_models

    models = parse_models(getattr(args, "model", []))
    extra = {"max_upload_bytes": int(args.max_upload_mb * 2**20)} if hasattr(args, "max_upload_mb") else {}
    return ServeSettings(args.storage, args.database, models, lease_s=getattr(args, "lease", 60.0),
                         poll_s=getattr(args, "poll", 1.0), **extra)


def run_serve(args: argparse.Namespace) -> int:
    from peftkit.errors import ConfigError
    from peftkit.serve.server import serve

    if not args.storage:
        raise ConfigError("serve: --storage DIR is required (the folder for files, job runs and the database)")
    serve(_settings(args), args.host, args.port, args.workers)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from peftkit.serve.server import work

    work(_settings(args))
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from peftkit.serve import store
    from peftkit.serve.db import connect

    settings = _settings(args)
    settings.storage.mkdir(parents=True, exist_ok=True)
    with connect(settings.storage, settings.database)() as s:
        if args.keys_command == "add":
            key = store.add_key(s, args.name)
            print(f"key {args.name!r} (keep it: it is shown once):")
            print(key)
        elif args.keys_command == "revoke":
            store.revoke_key(s, args.name)
            print(f"key {args.name!r} revoked")
        else:
            for row in store.list_keys(s):
                print(f"{row.name}\tcreated {row.created_at}\t{'revoked' if row.revoked_at else 'active'}")
    return 0


REGISTER = [_serve, _worker]
