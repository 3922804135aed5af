"""Classification data (``task: seq_cls``): records with a ``text`` and a ``label``, and the label set.

Sources:

* a built-in classification dataset (``rotten-tomatoes``): the review is the text, its sentiment the label
  (``negative`` / ``positive``, from rotten / fresh);
* user files (.jsonl/.json/.csv/.parquet) whose records have a ``text`` string and a ``label`` (a string or
  an integer). The label set is the sorted set of the training split's labels; index i of that list is
  class i of the model's head. A validation or test label outside that set is an error naming its line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from peftkit.errors import DataError

Record = dict[str, Any]  # {"text": str, "label": str}


@dataclass
class ClassificationSplits:
    """Records ``{"text", "label"}`` of each split; ``labels`` are the class names in head order."""

    train: list[Record]
    validation: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    format: str = "text"  # so that code reading ``Splits.format`` sees a raw-text dataset

    @property
    def label_options(self) -> list[str]:
        return self.labels


def load_classification(train: str, validation: str | None = None, test: str | None = None,
                        validation_fraction: float = 0.05, seed: int = 0) -> ClassificationSplits:
    """Splits of a built-in classification dataset or of user files.

    A user file with no validation file gets ``validation_fraction`` of its rows held out (seeded), as for
    generation data.

    Raises:
        DataError: unknown dataset, a built-in dataset without labels, a file without ``text``/``label``
            fields (naming the file and line), fewer than two classes, or a label unseen in training.
    """
    from peftkit.data import builtin

    if train in builtin.BUILTIN_DATASETS:
        labels = builtin.label_options(train)
        if labels is None:
            classification = [n for n in builtin.BUILTIN_DATASETS if builtin.label_options(n)]
            raise DataError(f"built-in dataset {train!r} has no labels: task seq_cls needs a classification dataset "
                            f"({', '.join(classification)}) or a file with text and label fields")
        parts = builtin.load_builtin(train)
        out = ClassificationSplits(*(_from_builtin(parts[s]) for s in ("train", "validation", "test")), labels=labels)
    else:
        rows, where = read_labelled(train)
        out = ClassificationSplits(rows)
        if validation is None and validation_fraction > 0 and len(rows) >= 20:
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            n_val = max(1, int(len(rows) * validation_fraction))
            out.validation = [rows[i] for i in order[:n_val]]
            out.train = [rows[i] for i in order[n_val:]]
        out.labels = label_set(out.train + out.validation)
        if len(out.labels) < 2:
            raise DataError(f"{train}: task seq_cls needs at least two different labels, found {out.labels}")
    for name, path in (("validation", validation), ("test", test)):
        if path is not None:
            rows, where = read_labelled(path)
            check_labels(rows, where, out.labels)
            setattr(out, name, rows)
    return out


def _from_builtin(records: list[Record]) -> list[Record]:
    # built-in classification records are alpaca rows: the text is the input, ``label`` the class name
    return [{"text": r["input"], "label": r["label"]} for r in records]


def read_labelled(path: str) -> tuple[list[Record], list[str]]:
    """``{"text", "label"}`` records of a file (labels as strings), and where each came from.

    Raises:
        DataError: unreadable file, or a record whose ``text`` or ``label`` is missing or of the wrong type.
    """
    from peftkit.data.formats import _check_text, read_records

    rows, where = read_records(path)
    out = []
    for row, loc in zip(rows, where):
        for key in ("text", "label"):
            if row.get(key) is None:
                raise DataError(f"{loc}: missing field {key!r} (task seq_cls reads records with text and label)")
        text, label = row["text"], row["label"]
        if not isinstance(text, str):
            raise DataError(f"{loc}: field 'text' must be a string, got {type(text).__name__}")
        _check_text(text, f"{loc}: field 'text'")
        if not text.strip():
            raise DataError(f"{loc}: field 'text' is empty")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{loc}: field 'label' must be a string or an integer, got {type(label).__name__}")
        if isinstance(label, str) and not label.strip():
            raise DataError(f"{loc}: field 'label' is empty")
        out.append({"text": text, "label": str(label).strip()})
    return out, where


def label_set(rows: Sequence[Record]) -> list[str]:
    """The sorted class names: numerically when every label is an integer (so "10" follows "9")."""
    names = {r["label"] for r in rows}
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_labels(rows: Sequence[Record], where: Sequence[str], labels: Sequence[str]) -> None:
    known = set(labels)
    for row, loc in zip(rows, where):
        if row["label"] not in known:
            raise DataError(f"{loc}: label {row['label']!r} is not among the training labels ({', '.join(labels)})")


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def encode_classification(tokenizer: Any, rows: Sequence[Record], labels: Sequence[str], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """``{"input_ids", "label"}`` per record (the tokenizer's special tokens added, cut to ``max_length``),
    and how many were truncated."""
    index = {name: i for i, name in enumerate(labels)}
    examples, truncated = [], 0
    for row in rows:
        ids = list(tokenizer(row["text"], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
        full = len(tokenizer(row["text"], add_special_tokens=True, verbose=False)["input_ids"]) if len(ids) == max_length else len(ids)
        truncated += full > max_length
        examples.append({"input_ids": ids, "label": index[row["label"]]})
    return examples, truncated


__all__ = ["ClassificationSplits", "encode_classification", "label_set", "load_classification", "read_labelled"]
