"""Getting the train / validation / test splits a run asks for, as checked records."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from peftkit.data.formats import read_records, validate
from peftkit.errors import DataError


@dataclass
class Splits:
    """Records of each split, their format, and (for classification data) the label options."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    format: str = "alpaca"
    label_options: list[str] | None = None


def load_file(path: str, fmt: str = "auto") -> tuple[list[dict[str, Any]], str]:
    """Checked records of a user file and their format."""
    rows, where = read_records(path)
    return rows, validate(rows, where, fmt)


def load_splits(train: str, validation: str | None = None, test: str | None = None, fmt: str = "auto",
                validation_fraction: float = 0.05, seed: int = 0) -> Splits:
    """Splits for a built-in dataset name or user files.

    A user file with no validation file gets ``validation_fraction`` of its rows held out (seeded).
    """
    from peftkit.data import builtin

    if train in builtin.BUILTIN_DATASETS:
        if fmt not in ("auto", "alpaca"):
            raise DataError(f"built-in dataset {train!r} is in alpaca format; data.format={fmt!r} does not apply")
        parts = builtin.load_builtin(train)
        splits = Splits(parts["train"], parts["validation"], parts["test"], "alpaca", builtin.label_options(train))
    else:
        if not _looks_like_path(train):
            known = ", ".join(builtin.BUILTIN_DATASETS)
            raise DataError(f"data.train {train!r} is neither a built-in dataset ({known}) nor a data file")
        rows, fmt = load_file(train, fmt)
        splits = Splits(rows, format=fmt)
        if validation is None and validation_fraction > 0 and len(rows) >= 20:
            rows = list(rows)
            random.Random(seed).shuffle(rows)
            n_val = max(1, int(len(rows) * validation_fraction))
            splits.validation, splits.train = rows[:n_val], rows[n_val:]
    for name, path in (("validation", validation), ("test", test)):
        if path is not None:
            rows, f = load_file(path, splits.format)
            setattr(splits, name, rows)
    return splits


def _looks_like_path(s: str) -> bool:
    from pathlib import Path

    try:
        return Path(s).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or Path(s).exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False
