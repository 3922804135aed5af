"""Reading user data files and checking their records.

Files: JSONL (one object per line), JSON (a list of objects), CSV and Parquet (via ``datasets``).
Formats, detected from the fields or named by ``data.format``:

* ``alpaca``: ``instruction``, optional ``input``, ``output``;
* ``chat``: ``messages`` = [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...] (OpenAI's
  fine-tuning format: an assistant message may carry ``weight`` 0/1 and ``tool_calls``; content may be a list
  of text parts), or ShareGPT's ``conversations`` = [{"from": "human"|"gpt"|"system", "value": str}, ...];
  rendered with the tokenizer's chat template; the loss is on every assistant turn (``data.chat_loss``);
* ``prompt_completion``: ``prompt`` + ``completion`` joined as they are, no template, loss on the completion;
* ``text``: ``text``, plain language modelling (loss on every token);
* ``preference``: pairs for preference tuning (DPO and friends): TRL's ``prompt``/``chosen``/``rejected`` or OpenAI's
  ``input``/``preferred_output``/``non_preferred_output`` (:mod:`peftkit.data.preference`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from peftkit.errors import DataError

#: a data file's format (``data.format``)
DataFormat = Literal["alpaca", "chat", "prompt_completion", "text", "preference"]
FORMATS: tuple[str, ...] = get_args(DataFormat)
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": (),
}
CHAT_KEYS = ("messages", "conversations")  # OpenAI's / ShareGPT's list of turns
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool"}
OPTIONAL_STR = {"alpaca": ("input", "system"), "chat": (), "prompt_completion": (), "text": (), "preference": ()}


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
    if suffix == ".csv" and any(key in rows[0] for key in CHAT_KEYS):
        key = next(k for k in CHAT_KEYS if k in rows[0])
        raise DataError(f"{path}: a CSV file cannot carry {key!r} (a list of messages per row); write chat data as "
                        "JSONL or Parquet")
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
    from peftkit.data.preference import is_preference

    if is_preference(row):
        return "preference"
    if any(key in row for key in CHAT_KEYS):
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(row)}; expected one of "
        "instruction/output (alpaca), messages or conversations (chat), prompt/completion, text, or "
        "prompt/chosen/rejected (preference)"
    )


def validate(rows: list[dict[str, Any]], where: list[str], fmt: str) -> str:
    """Check every row has the format's fields with the right types; return the (detected) format."""
    if fmt == "auto":
        fmt = detect_format(rows[0], where[0])
    if fmt not in FORMATS:
        raise DataError(f"data.format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    for row, loc in zip(rows, where):
        if fmt == "preference":  # checked and rewritten in place to {messages, chosen, rejected}
            from peftkit.data.preference import normalize_pair

            pair = normalize_pair(row, loc)
            row.clear()
            row.update(pair)
            continue
        if fmt == "chat":  # checked and rewritten in place to OpenAI's form with string contents
            row["messages"] = normalize_chat(row, loc)
            row.pop("conversations", None)
            continue
        for key in REQUIRED[fmt]:
            if key not in row or row[key] is None:
                raise DataError(f"{loc}: missing field {key!r} (format {fmt})")
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


def normalize_chat(row: dict[str, Any], loc: str) -> list[dict[str, Any]]:
    """A chat row's turns as OpenAI messages whose ``content`` is a string.

    Accepts ``messages`` (OpenAI: content a string or a list of ``{"type": "text", "text": ...}`` parts; assistant
    ``tool_calls``; ``role: tool`` results; ``weight`` 0/1 on assistant messages) or ShareGPT's
    ``conversations`` (``from``/``value``).

    Raises:
        DataError: naming the row and the message: a wrong role or content type, a weight other than 0/1, no
            final assistant message, or a final assistant message with nothing in it (the answer trained and scored).
    """
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{loc}: field 'messages' must be a non-empty list")
        out = [_openai_message(m, f"{loc}: messages[{j}]") for j, m in enumerate(messages)]
    elif "conversations" in row and row["conversations"] is not None:
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{loc}: field 'conversations' must be a non-empty list")
        out = [_sharegpt_message(m, f"{loc}: conversations[{j}]") for j, m in enumerate(turns)]
    else:
        raise DataError(f"{loc}: missing field 'messages' (format chat; or ShareGPT's 'conversations')")
    last = out[-1]
    if last["role"] != "assistant":
        raise DataError(f"{loc}: the last message must be the assistant's (it is what the model learns to say)")
    if not last["content"].strip() and not last.get("tool_calls"):
        raise DataError(f"{loc}: the last (assistant) message is empty; it is the answer trained on and scored against")
    return out


def _openai_message(m: Any, where: str) -> dict[str, Any]:
    shape = "{'role': system|user|assistant|tool, 'content': str or [{'type': 'text', 'text': str}, ...]}"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise DataError(f"{where} must be {shape}")
    m = {k: v for k, v in m.items() if v is not None}  # Parquet gives every message every field, unset ones None
    out = {k: v for k, v in m.items() if k not in ("content", "weight")}
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise DataError(f"{where}.content: a list of parts must hold only {{'type': 'text', 'text': str}} parts")
        content = "".join(p["text"] for p in content)
    elif content is None and m["role"] == "assistant" and m.get("tool_calls"):
        content = ""  # a message that only calls tools
    if not isinstance(content, str):
        raise DataError(f"{where} must be {shape}")
    _check_text(content, f"{where}.content")
    out["content"] = content
    if "tool_calls" in m:
        _check_tool_calls(m["tool_calls"], where, m["role"])
    if "weight" in m:
        weight = m["weight"]
        if m["role"] != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
            raise DataError(f"{where}.weight must be 0 or 1 on an assistant message, got {weight!r} "
                            f"(role {m['role']})")
        out["weight"] = int(weight)
    return out


def _check_tool_calls(calls: Any, where: str, role: str) -> None:
    ok = role == "assistant" and isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in calls)
    if not ok:
        raise DataError(f"{where}.tool_calls must be a list of {{'type': 'function', 'function': {{'name': str, "
                        "'arguments': ...}}}} on an assistant message")


def _sharegpt_message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES or not isinstance(m.get("value"), str):
        raise DataError(f"{where} must be {{'from': human|gpt|system, 'value': str}}")
    _check_text(m["value"], f"{where}.value")
    return {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}
