"""Reading user data files and checking their records.

Files: JSONL (one object per line), JSON (a list of objects), CSV and Parquet (via ``datasets``).
Formats, detected from the fields or named by ``data.format``:

* ``alpaca``: ``instruction``, optional ``input``, ``output``;
* ``chat``: ``messages`` = [{"role": "system"|"user"|"assistant", "content": str}, ...] (OpenAI's
  fine-tuning format), rendered with the tokenizer's chat template; the loss is on the last assistant turn;
* ``prompt_completion``: ``prompt`` + ``completion`` joined as they are, no template, loss on the completion;
* ``text``: ``text``, plain language modelling (loss on every token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_STR = {"alpaca": ("input", "system"), "chat": (), "prompt_completion": (), "text": ()}


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a data file, and for each row where it came from (``file:line`` or ``file row N``).

    Raises:
        DataError: missing file, unknown extension, malformed JSON (with the line number), a row that is
            not an object, or an empty file.
    """
    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise DataError(f"data file {str(path)[:200]!r}: unusable path ({getattr(e, 'strerror', None) or e})") from None
    if not found:
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, where = _read_jsonl(path)
    elif suffix == ".json":
        rows, where = _read_json(path)
    elif suffix in (".csv", ".parquet"):
        rows, where = _read_tabular(path, suffix[1:])
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if not rows:
        raise DataError(f"{path}: no examples in the file")
    return rows, where


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer longer than Python's digit limit
            raise DataError(f"{path}:{i}: unreadable JSON value ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path}:{i}")
    return rows, where


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        raise DataError(f"{path}: unreadable JSON value ({str(e).splitlines()[0][:120]})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} is a {type(row).__name__}, expected an object")
    return data, [f"{path} item {i}" for i in range(len(data))]


def _read_tabular(path: Path, kind: str) -> tuple[list[dict], list[str]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_csv(str(path)) if kind == "csv" else datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # the readers raise many types; the file is what is wrong
        raise DataError(f"{path}: cannot read as {kind.upper()} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    rows = ds.to_list()
    offset = 2 if kind == "csv" else 0  # CSV: line 1 is the header
    label = "line" if kind == "csv" else "row"
    return rows, [f"{path} {label} {i + offset}" for i in range(len(rows))]


def detect_format(row: dict[str, Any], where: str = "data") -> str:
    """The format a record is in, judged by its fields."""
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(row)}; expected one of "
        "instruction/output (alpaca), messages (chat), prompt/completion, or text"
    )


def validate(rows: list[dict[str, Any]], where: list[str], fmt: str) -> str:
    """Check every row has the format's fields with the right types; return the (detected) format."""
    if fmt == "auto":
        fmt = detect_format(rows[0], where[0])
    if fmt not in FORMATS:
        raise DataError(f"data.format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    for row, loc in zip(rows, where):
        for key in REQUIRED[fmt]:
            if key not in row or row[key] is None:
                raise DataError(f"{loc}: missing field {key!r} (format {fmt})")
        if fmt == "chat":
            _check_messages(row["messages"], loc)
            continue
        for key in REQUIRED[fmt] + OPTIONAL_STR[fmt]:
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{loc}: field {key!r} must be a string, got {type(value).__name__}")
            _check_text(value, f"{loc}: field {key!r}")
        if fmt != "text" and not row[REQUIRED[fmt][-1]].strip():
            raise DataError(f"{loc}: field {REQUIRED[fmt][-1]!r} is empty")
    return fmt


def _check_text(value: str | None, where: str) -> None:
    """Strings must be encodable text: JSON's ``\\ud800`` escapes give lone surrogates, which tokenizers reject."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where} is not valid Unicode text (lone surrogate at character {e.start})") from None


def _check_messages(messages: Any, loc: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{loc}: field 'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{loc}: messages[{j}] must be {{'role': system|user|assistant, 'content': str}}")
        _check_text(m["content"], f"{loc}: messages[{j}].content")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{loc}: the last message must be the assistant's (it is what the model learns to say)")
