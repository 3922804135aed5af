"""The HTTP API: OpenAI's files, fine-tuning jobs and models endpoints, so that the official ``openai`` client
(``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)``) drives it unchanged.

Errors are OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``) with the status code the
client maps to its exception classes (400 BadRequest, 401, 403, 404 NotFound, 413). Conflicts of state (cancel a
finished job) are 400, not 409: the client retries a 409. Another key's objects are 404, never 403.
Lists page as the client pages: newest first, ``after=<last id>``, ``has_more``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from peftkit.errors import PeftkitError
from peftkit.serve import objects, store
from peftkit.serve.db import ApiKey, Checkpoint, Event, File, Job, connect
from peftkit.serve.jobs import RequestError, parse_request
from peftkit.serve.settings import ServeSettings
from peftkit.serve.validate import check_lines

router = APIRouter(prefix="/v1")


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(settings: ServeSettings, sessions: sessionmaker | None = None) -> FastAPI:
    """The API over ``settings``' storage and database (migrated to the newest schema)."""
    app = FastAPI(title="peftkit serve", version="1", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.state.settings = settings
    app.state.sessions = sessions or connect(settings.storage, settings.database)
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(store.NotFound, _not_found)
    app.add_exception_handler(PeftkitError, _bad_request)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At start: warm up what checking files needs, and check again the jobs a killed server left in
    ``validating_files``."""
    threading.Thread(target=objects.warm_up, daemon=True).start()
    with app.state.sessions() as s:
        stuck = list(s.scalars(select(Job.id).where(Job.status == "validating_files")))
    loop = asyncio.get_running_loop()
    for job_id in stuck:
        loop.run_in_executor(None, objects.validate_job, app.state.sessions, app.state.settings, job_id)
    yield


async def _api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


async def _not_found(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(str(e), param=None, code="not_found"), status_code=404)


async def _bad_request(_: Request, e: Exception) -> JSONResponse:
    param, code = (e.param, e.code) if isinstance(e, RequestError) else (None, None)
    return JSONResponse(error_body(str(e).splitlines()[0] if str(e) else type(e).__name__, param=param, code=code),
                        status_code=400)


async def _invalid(_: Request, e: Exception) -> JSONResponse:
    first = e.errors()[0] if isinstance(e, RequestValidationError) and e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return JSONResponse(error_body(f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where),
                        status_code=400)


async def _http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)


# -- dependencies ------------------------------------------------------------------------------------
def _session(request: Request) -> Any:
    with request.app.state.sessions() as s:
        yield s


Db = Annotated[Session, Depends(_session)]


def _key(request: Request, s: Db) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    key = store.key_for(s, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if key is None:
        message = ("You didn't provide an API key (Authorization: Bearer KEY; make one with `peftkit serve keys add "
                   "NAME`)" if not token.strip() else "Incorrect API key provided")
        raise ApiError(401, message, code="invalid_api_key")
    return key


Key = Annotated[ApiKey, Depends(_key)]


def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings


Settings = Annotated[ServeSettings, Depends(_settings)]


# -- files -------------------------------------------------------------------------------------------
@router.post("/files")
async def create_file(key: Key, s: Db, settings: Settings, file: UploadFile,
                      purpose: Annotated[str, Form()]) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise ApiError(400, f"purpose {purpose!r}: this server takes fine-tune files only", "purpose")
    name = file.filename or "upload.jsonl"
    if not name.lower().endswith(".jsonl"):
        raise ApiError(400, f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {name[:100]!r})", "file",
                       "invalid_file_format")
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, f"file larger than the server's limit of {settings.max_upload_bytes:,} bytes", "file",
                       "file_too_large")
    checked = await asyncio.get_running_loop().run_in_executor(None, check_lines, data)
    if checked.errors:
        raise ApiError(400, checked.summary(name[:100]), "file", "invalid_file_format")
    row = store.add_file(s, key.id, name, purpose, data, len(checked.rows), settings.storage)
    return objects.file_object(row)


@router.get("/files")
def list_files(key: Key, s: Db, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc", after: str | None = None,
               ) -> dict[str, Any]:
    where = [File.owner == key.id] + ([File.purpose == purpose] if purpose else [])
    rows, more = store.page(s, File, where, after, limit, newest_first=order == "desc")
    return objects.page([objects.file_object(r) for r in rows], more)


@router.get("/files/{file_id}")
def get_file(file_id: str, key: Key, s: Db) -> dict[str, Any]:
    return objects.file_object(store.get_file(s, key.id, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, key: Key, s: Db, settings: Settings) -> Response:
    row = store.get_file(s, key.id, file_id)
    data = store.file_path(settings.storage, row.id).read_bytes()
    return Response(data, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, key: Key, s: Db, settings: Settings) -> dict[str, Any]:
    try:
        store.delete_file(s, key.id, file_id, settings.storage)
    except store.Conflict as e:
        raise ApiError(400, str(e), "file_id") from None
    return {"id": file_id, "object": "file", "deleted": True}


# -- jobs --------------------------------------------------------------------------------------------
@router.post("/fine_tuning/jobs")
async def create_job(request: Request, key: Key, s: Db, settings: Settings) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    job = objects.new_job(s, key, settings, parse_request(body))
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, objects.validate_job, request.app.state.sessions, settings, job.id)
    return objects.job_object(job)


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, key: Key, s: Db, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    rows, more = store.page(s, Job, [Job.owner == key.id], after, limit if not meta else 10**9)
    if meta:  # metadata is JSON: filtered here, the same on SQLite and PostgreSQL
        rows = [r for r in rows if all((r.meta or {}).get(k) == v for k, v in meta.items())]
        rows, more = rows[:limit], len(rows) > limit
    return objects.page([objects.job_object(r) for r in rows], more)


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, key: Key, s: Db) -> dict[str, Any]:
    return objects.job_object(store.get_job(s, key.id, job_id))


@router.post("/fine_tuning/jobs/{job_id}/{action}")
def job_action(job_id: str, action: str, key: Key, s: Db) -> dict[str, Any]:
    act = {"cancel": store.cancel, "pause": store.pause, "resume": store.resume}.get(action)
    if act is None:
        raise ApiError(404, f"Unknown job action {action!r} (cancel, pause, resume)")
    try:
        return objects.job_object(act(s, key.id, job_id))
    except store.Conflict as e:
        raise ApiError(400, str(e), "job_id") from None


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, key: Key, s: Db, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    store.get_job(s, key.id, job_id)
    rows, more = store.page(s, Event, [Event.job_id == job_id], after, limit)
    return objects.page([objects.event_object(r) for r in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, key: Key, s: Db, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
    job = store.get_job(s, key.id, job_id)
    rows, more = store.page(s, Checkpoint, [Checkpoint.job_id == job_id], after, limit)
    return objects.page([objects.checkpoint_object(r, job) for r in rows], more)


# -- models ------------------------------------------------------------------------------------------
@router.get("/models")
def list_models(key: Key, s: Db, settings: Settings) -> dict[str, Any]:
    data = [objects.base_object(name) for name in settings.bases()]
    data += [objects.model_object(job, key) for job in store.fine_tuned_models(s, key.id)]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def get_model(model: str, key: Key, s: Db, settings: Settings) -> dict[str, Any]:
    if model in settings.bases():
        return objects.base_object(model)
    return objects.model_object(objects.own_model(s, key, model), key)


@router.delete("/models/{model:path}")
def delete_model(model: str, key: Key, s: Db, settings: Settings) -> dict[str, Any]:
    if model in settings.bases():
        raise ApiError(403, f"{model} is a base model; only your fine-tuned models can be deleted", "model",
                       "model_not_deletable")
    job = objects.own_model(s, key, model)
    job.model_deleted = True
    store.add_event(s, job.id, f"Fine-tuned model {model} deleted", commit=False)
    s.commit()
    return {"id": model, "object": "model", "deleted": True}
