"""A fine-tuning job request (OpenAI's ``POST /v1/fine_tuning/jobs``) checked, its ``"auto"`` values resolved,
and turned into the :class:`~peftkit.runs.config.RunConfig` its run trains with.

OpenAI's fields: ``model``, ``training_file``, ``validation_file``, ``suffix``, ``seed``, ``metadata``,
``hyperparameters`` (deprecated) or ``method: {type: supervised, supervised: {hyperparameters: {n_epochs,
batch_size, learning_rate_multiplier}}}``. peftkit's own choices come in ``peftkit`` (the client's
``extra_body={"peftkit": {...}}``): ``method`` (any registered method and its settings, ``{"name": "dora",
"r": 16}``; LoRA by default) and ``settings`` (dotted run-config keys, ``{"data.max_length": 512}``).

"auto" (resolved when the job is created, and reported back in the job):
- ``n_epochs``: OpenAI's published rule: 3, raised so that the run sees at least 100 examples and lowered to at
  most 25,000, within 1-25.
- ``batch_size``: 8, or an eighth of the file for files under 64 examples (at least 1): CPU-sized.
- ``learning_rate_multiplier``: 1, times the method's default learning rate (LoRA 2e-4, ``peftkit info``).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError

#: job types this service runs: supervised fine-tuning, and DPO on preference files (``train.objective=dpo``)
METHOD_TYPES = ("supervised", "dpo")
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HYPER = ("n_epochs", "batch_size", "learning_rate_multiplier")


class RequestError(ConfigError):
    """A bad field in a request: ``param`` names it (OpenAI's error object carries it)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class JobSpec:
    """What a create request asks for, checked (the resolution of "auto" needs the file's size: :meth:`resolve`)."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]  # the PEFT method, {"name": ..., ...}
    settings: dict[str, Any]
    kind: str = "supervised"  # OpenAI's method.type

    def resolve(self, examples: int) -> dict[str, Any]:
        """``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` (and DPO's ``beta``) with every "auto"
        replaced."""
        h = dict(self.hyperparameters)
        if h.get("beta") == "auto":
            h["beta"] = 0.1
        if h["n_epochs"] == "auto":
            h["n_epochs"] = auto_epochs(examples)
        if h["batch_size"] == "auto":
            h["batch_size"] = 8 if examples >= 64 else max(1, examples // 8)
        if h["learning_rate_multiplier"] == "auto":
            h["learning_rate_multiplier"] = 1.0
        return h


def auto_epochs(examples: int, target: int = 3, low: int = 100, high: int = 25_000) -> int:
    """OpenAI's rule (cookbook, "Chat fine-tuning data prep"): ``target`` epochs, more when that would see fewer
    than ``low`` examples, fewer when more than ``high``, within 1-25."""
    n = max(examples, 1)
    if n * target < low:
        return min(25, math.ceil(low / n))
    if n * target > high:
        return max(1, high // n)
    return target


def parse_request(body: Any) -> JobSpec:
    """Check a create-job body field by field.

    Raises:
        RequestError: the first bad field, named in ``param``.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in ("model", "training_file"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise RequestError(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix)):
        raise RequestError("suffix must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                           "suffix")
    seed = body.get("seed")
    if seed is None:  # as OpenAI does: a random one, reported back in the job
        seed = secrets.randbelow(2_147_483_648)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2_147_483_647:
        raise RequestError("seed must be an integer in 0..2147483647", "seed")
    validation = body.get("validation_file")
    if validation is not None and not isinstance(validation, str):
        raise RequestError("validation_file must be a file id", "validation_file")
    kind, hyper = _hyperparameters(body)
    return JobSpec(body["model"], body["training_file"], validation, suffix, seed, _metadata(body.get("metadata")),
                   hyper, *_peftkit(body.get("peftkit")), kind=kind)


def _metadata(meta: Any) -> dict[str, str] | None:
    if meta is None:
        return None
    ok = isinstance(meta, dict) and len(meta) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in meta.items())
    if not ok:
        raise RequestError("metadata must be at most 16 string pairs (keys up to 64 characters, values up to 512)",
                           "metadata")
    return dict(meta)


def _hyperparameters(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(method type, hyperparameters)``, each "auto" or checked."""
    method = body.get("method")
    given: Any = body.get("hyperparameters") or {}
    param, kind = "hyperparameters", "supervised"
    if method is not None:
        if not isinstance(method, dict) or method.get("type") not in METHOD_TYPES:
            kind = method.get("type") if isinstance(method, dict) else method
            raise RequestError(f"method.type {kind!r} is not supported here (use {', '.join(METHOD_TYPES)})",
                               "method.type")
        kind = method["type"]
        section = method.get(kind) or {}
        if not isinstance(section, dict):
            raise RequestError(f"method.{kind} must be an object", f"method.{kind}")
        given = section.get("hyperparameters") or {}
        param = f"method.{kind}.hyperparameters"
    if not isinstance(given, dict):
        raise RequestError(f"{param} must be an object", param)
    names = _HYPER + (("beta",) if kind == "dpo" else ())
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise RequestError(f"{param}.{unknown[0]} is not a hyperparameter (use {', '.join(names)})", param)
    return kind, _checked(given, names, param)


def _checked(given: dict[str, Any], names: tuple[str, ...], param: str) -> dict[str, Any]:
    out = {k: given.get(k, "auto") for k in names}
    checks = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 0.0, 10.0),
              "beta": (float, 0.0, 2.0)}
    checks = {k: v for k, v in checks.items() if k in names}
    for key, (kind, low, high) in checks.items():
        v = out[key]
        if v == "auto":
            continue
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (kind is float or whole)
        if not ok or not (low < v <= high if kind is float else low <= v <= high):  # compared before any float()
            span = f"in ({low}, {high}]" if kind is float else f"an integer in {low}..{high}"
            raise RequestError(f"{param}.{key} must be \"auto\" or {span}, got {v!r}", f"{param}.{key}")
        out[key] = kind(v)
    return out


def _peftkit(extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """peftkit's own part of the request: the PEFT method and dotted run settings, checked now."""
    from peftkit.core.config import method_from_dict

    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or set(extra) - {"method", "settings"}:
        raise RequestError("peftkit must be an object with 'method' and/or 'settings'", "peftkit")
    method = extra.get("method") or {"name": "lora"}
    if isinstance(method, str):
        method = {"name": method}
    try:
        method_from_dict(method, "peftkit.method")
    except ConfigError as e:
        raise RequestError(str(e), "peftkit.method") from None
    settings = extra.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise RequestError("peftkit.settings must map dotted config keys to values", "peftkit.settings")
    owned = [k for k in settings if k.split(".")[0] in ("model", "output_dir", "method", "overwrite")
             or k in ("data.train", "data.validation", "train.seed", "train.max_steps", "train.batch_size")]
    if owned:
        raise RequestError(f"peftkit.settings: {owned[0]} is set by the job itself", "peftkit.settings")
    return method, settings


def run_config(job: Any, storage: Path, base_path: str, examples: int) -> dict[str, Any]:
    """The run config (as a mapping for :func:`peftkit.runs.config.from_dict`) a job trains with: its own run
    folder, its files, the resolved hyperparameters; a checkpoint every epoch (and at most every
    ``max(1, steps // 10)`` steps, so a crash loses little)."""
    from peftkit.runs.config import apply_override

    kind = job.method["type"]
    h = job.method[kind]["hyperparameters"]
    per_epoch = math.ceil(examples / h["batch_size"])
    steps = per_epoch * h["n_epochs"]
    files = Path(storage) / "files"
    data: dict[str, Any] = {
        "model": base_path,
        "method": job.peftkit["method"],
        "output_dir": str(job_dir(storage, job.id) / "run"),
        "overwrite": True,
        "data": {"train": str(files / f"{job.training_file}.jsonl"), "validation_fraction": 0.0,
                 "max_train_examples": None},
        "train": {"max_steps": steps, "batch_size": h["batch_size"], "seed": job.seed,
                  "save_every": min(per_epoch, max(1, steps // 10)), "keep_checkpoints": 3,
                  "log_every": max(1, steps // 100), "eval_every": 0},
    }
    if kind == "dpo":
        data["train"].update(objective="dpo", beta=h["beta"])
    if job.validation_file:
        data["data"]["validation"] = str(files / f"{job.validation_file}.jsonl")
        data["train"]["eval_every"] = per_epoch
    from peftkit.core.config import method_from_dict

    data["train"]["lr"] = h["learning_rate_multiplier"] * method_from_dict(dict(job.peftkit["method"])).default_lr
    for key, value in job.peftkit.get("settings", {}).items():
        apply_override(data, f"{key}={json.dumps(value, ensure_ascii=False)}")  # YAML reads JSON; no \\u escapes
    return data


def job_dir(storage: Path, job_id: str) -> Path:
    return Path(storage) / "jobs" / job_id


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's form without an organization: ``ft:<base>:<suffix>:<job id>`` (an empty slot without suffix)."""
    return f"ft:{base}:{suffix or ''}:{job_id}"
