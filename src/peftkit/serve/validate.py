"""Training files as the service takes them: every malformed line reported with its number and the reason.

Upload (:func:`check_lines`): each line must be a JSON object in one format peftkit trains on (OpenAI's chat
``messages``, ``prompt``/``completion``, alpaca or text), checked by the same rules as ``peftkit train``
(:mod:`peftkit.data.formats`), but every line is checked, not only up to the first fault.
Job start (:func:`check_lengths`): each example rendered with the base's tokenizer and template; one longer than
the model can read is an error, one longer than the job's ``data.max_length`` is truncated (reported).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from peftkit.data.formats import ROLES, detect_format, validate
from peftkit.errors import DataError

#: how many faulty lines one error message lists (all are counted)
LISTED = 20


@dataclass(frozen=True)
class LineError:
    """One malformed line: 1-based ``line``, a short ``code`` (OpenAI's cookbook names where one fits)."""

    line: int
    code: str
    message: str


@dataclass
class Checked:
    """What :func:`check_lines` found: the rows (parsed, in order), the format, the faults, and the line of the
    file each row came from."""

    rows: list[dict[str, Any]]
    format: str | None
    errors: list[LineError]
    lines: list[int] = field(default_factory=list)

    def summary(self, what: str = "training file") -> str:
        """One line naming every fault (the first :data:`LISTED`)."""
        listed = "; ".join(f"line {e.line}: {e.message}" for e in self.errors[:LISTED])
        more = f"; and {len(self.errors) - LISTED} more" if len(self.errors) > LISTED else ""
        n = len(self.errors)
        return f"{what} has {n} malformed line{'s' if n != 1 else ''}: {listed}{more}"


def check_lines(data: bytes) -> Checked:
    """Parse and check a JSONL upload line by line (blank lines are skipped; lines end at ``\n`` only: JSON
    strings may hold U+2028 and friends)."""
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[bom: bom + e.start].count(b"\n") + 1
        error = LineError(line, "invalid_encoding", f"not UTF-8 text ({e.reason} at byte {bom + e.start})")
        return Checked([], None, [error])
    rows, lines, errors, fmt = [], [], [], None
    for i, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(LineError(i, "invalid_json", f"malformed JSON ({e.msg}, column {e.colno})"))
            continue
        except RecursionError:
            errors.append(LineError(i, "invalid_json", "malformed JSON (nested too deeply)"))
            continue
        except ValueError as e:  # e.g. an integer past Python's digit limit
            errors.append(LineError(i, "invalid_json", f"unreadable JSON value ({str(e).splitlines()[0][:120]})"))
            continue
        error = _check_row(row, i, fmt)
        if error is not None:
            errors.append(error)
            continue
        fmt = fmt or detect_format(row)
        rows.append(row)
        lines.append(i)
    if not rows and not errors:
        errors.append(LineError(1, "empty_file", "no examples in the file"))
    return Checked(rows, fmt, errors, lines)


def _check_row(row: Any, line: int, fmt: str | None) -> LineError | None:
    if not isinstance(row, dict):
        return LineError(line, "data_type", f"expected a JSON object, got {type(row).__name__}")
    loc = f"line {line}"
    try:
        found = detect_format(row, loc)
        role = _unknown_role(row)
        if role is not None:
            return LineError(line, "unrecognized_role", role)
        if fmt is not None and found != fmt:
            return LineError(line, "format_mismatch", f"a {found} example in a file of {fmt} examples")
        validate([row], [loc], found)
    except DataError as e:
        message = str(e).removeprefix(f"{loc}: ")
        return LineError(line, _code(message), message)
    return None


def _unknown_role(row: dict[str, Any]) -> str | None:
    """The first message whose role does not exist, said plainly (the format check's message is about shape)."""
    messages = row.get("messages")
    for j, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") not in ROLES:
            return f"messages[{j}]: role {m.get('role')!r} does not exist (use {', '.join(ROLES)})"
    return None


def _code(message: str) -> str:
    """OpenAI's cookbook check names for the faults it knows."""
    if "missing field 'messages'" in message:
        return "missing_messages_list"
    if "last message must be the assistant" in message:
        return "example_missing_assistant_message"
    if "cannot tell the data format" in message:
        return "unknown_format"
    if "missing field" in message:
        return "missing_field"
    return "invalid_example"


def check_lengths(rows: list[dict[str, Any]], template: Any, context: int, max_length: int,
                  lines: Sequence[int] | None = None) -> tuple[list[LineError], int]:
    """``(too long for the model, how many will be truncated to max_length)``: each row rendered as training
    renders it (``template``: :class:`peftkit.data.template.Template`); ``lines``: the file's line of each row
    (:attr:`Checked.lines`; default 1, 2, ...)."""
    from peftkit.data.tokenize import encode_example

    too_long, truncated = [], 0
    for i, row in zip(lines or range(1, len(rows) + 1), rows, strict=True):
        enc, _ = encode_example(template, row, 10**9)
        n = len(enc["input_ids"])
        if n > context:
            too_long.append(LineError(i, "too_long", f"{n} tokens, longer than the model reads ({context})"))
        elif n > max_length:
            truncated += 1
    return too_long, truncated
