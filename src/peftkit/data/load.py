"""Getting the train / validation / test splits a run asks for, as checked records."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from peftkit.data.formats import read_records, validate
from peftkit.errors import DataError

TEST_FRACTION = 0.1  # of a single file with answers, held out as its test split
MIN_SPLIT_ROWS = 20  # a file with fewer rows is not split (too few to hold anything out)
#: the test hold-out's seed is fixed, not the run's: ``eval`` / ``compare`` find the rows a training run left out
#: whatever ``train.seed`` it had
TEST_SEED = 0x7E57


@dataclass
class Splits:
    """Records of each split, their format, and (for classification data) the label options."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    format: str = "alpaca"
    label_options: list[str] | None = None
    test_source: str | None = None  # where the test split came from, in words (printed by eval / compare)


def load_file(path: str, fmt: str = "auto") -> tuple[list[dict[str, Any]], str]:
    """Checked records of a user file and their format."""
    rows, where = read_records(path)
    return rows, validate(rows, where, fmt)


def load_splits(train: str, validation: str | None = None, test: str | None = None, fmt: str = "auto",
                validation_fraction: float = 0.05, seed: int = 0) -> Splits:
    """Splits for a built-in dataset name or user files.

    A user file with no test file (and answers to score: not ``text``) gets ``TEST_FRACTION`` of its rows held out
    as the test split, with the fixed ``TEST_SEED``, so a run never trains on the rows ``eval`` and ``compare``
    score; with no validation file, ``validation_fraction`` of the file (by row count) is held out from the rest
    with ``seed``. Files under ``MIN_SPLIT_ROWS`` rows are not split.
    """
    from peftkit.data import builtin

    if train in builtin.BUILTIN_DATASETS:
        own = builtin.data_format(train)
        if fmt not in ("auto", own):
            raise DataError(f"built-in dataset {train!r} is in {own} format; data.format={fmt!r} does not apply")
        parts = builtin.load_builtin(train)
        if own == "preference":  # to the normalized {messages, chosen, rejected} the encoder takes
            for name, rows in parts.items():
                validate(rows, [f"{train} {name} row {i}" for i in range(len(rows))], own)
        splits = Splits(parts["train"], parts["validation"], parts["test"], own, builtin.label_options(train))
    else:
        if not _looks_like_path(train):
            known = ", ".join(builtin.BUILTIN_DATASETS)
            raise DataError(f"data.train {train!r} is neither a built-in dataset ({known}) nor a data file")
        rows, fmt = load_file(train, fmt)
        splits = Splits(rows, format=fmt)
        n_rows = len(rows)
        if test is None and fmt != "text" and n_rows >= MIN_SPLIT_ROWS:
            held = set(random.Random(TEST_SEED).sample(range(n_rows), max(1, int(n_rows * TEST_FRACTION))))
            splits.test = [r for i, r in enumerate(rows) if i in held]
            splits.train = rows = [r for i, r in enumerate(rows) if i not in held]
            splits.test_source = (f"no test file: {len(held)} of the {n_rows} rows of {train} held out as the test "
                                  f"split (seeded; training leaves them out)")
        if validation is None and validation_fraction > 0 and n_rows >= MIN_SPLIT_ROWS:
            rows = list(rows)
            random.Random(seed).shuffle(rows)
            n_val = max(1, int(n_rows * validation_fraction))
            splits.validation, splits.train = rows[:n_val], rows[n_val:]
    for name, path in (("validation", validation), ("test", test)):
        if path is not None:
            rows, f = load_file(path, splits.format)
            setattr(splits, name, rows)
    if test is not None:
        splits.test_source = f"test file {test}"
    return splits


def _looks_like_path(s: str) -> bool:
    from pathlib import Path

    try:
        return Path(s).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or Path(s).exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False
