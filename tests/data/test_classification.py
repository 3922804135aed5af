"""Classification data (task seq_cls): the built-in rotten-tomatoes as text + label, user files with text/label
fields, the label set, and one clear error (file, line, field) for every bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.data.classification import encode_classification, label_set, load_classification
from peftkit.errors import DataError


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rotten_tomatoes_is_a_classification_dataset() -> None:
    splits = load_classification("rotten-tomatoes")
    assert splits.labels == ["negative", "positive"]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (10201, 1275, 1275)
    assert set(splits.train[0]) == {"text", "label"} and splits.train[0]["label"] in splits.labels
    assert not {r["text"] for r in splits.test} & {r["text"] for r in splits.train}


def test_generation_dataset_is_refused() -> None:
    with pytest.raises(DataError, match=r"'chatterbot' has no labels.*rotten-tomatoes"):
        load_classification("chatterbot")


def test_user_file_with_held_out_validation_and_test_file(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": ["bad", "good", "meh"][i % 3]} for i in range(40)]
    test = write(tmp_path / "test.jsonl", [{"text": "fine", "label": "good"}])
    splits = load_classification(str(write(tmp_path / "train.jsonl", rows)), test=str(test), validation_fraction=0.1)
    assert splits.labels == ["bad", "good", "meh"]
    assert len(splits.train) == 36 and len(splits.validation) == 4 and splits.test == [{"text": "fine", "label": "good"}]


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 11} for i in range(22)]
    splits = load_classification(str(write(tmp_path / "d.jsonl", rows)), validation_fraction=0.0)
    assert splits.labels == [str(i) for i in range(11)]
    assert label_set([{"label": "b"}, {"label": "a"}]) == ["a", "b"]


@pytest.mark.parametrize("record, message", [
    ({"text": "ok"}, r"d.jsonl:2: missing field 'label'"),
    ({"label": "a"}, r"d.jsonl:2: missing field 'text'"),
    ({"text": 3, "label": "a"}, r"d.jsonl:2: field 'text' must be a string"),
    ({"text": " ", "label": "a"}, r"d.jsonl:2: field 'text' is empty"),
    ({"text": "ok", "label": [1]}, r"d.jsonl:2: field 'label' must be a string or an integer, got list"),
    ({"text": "ok", "label": True}, r"d.jsonl:2: field 'label' must be a string or an integer, got bool"),
    ({"text": "ok", "label": ""}, r"d.jsonl:2: field 'label' is empty"),
])
def test_bad_records_name_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = write(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, record])
    with pytest.raises(DataError, match=message):
        load_classification(str(path))


def test_one_label_and_unseen_test_label_are_errors(tmp_path: Path) -> None:
    one = write(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}] * 3)
    with pytest.raises(DataError, match=r"one.jsonl: task seq_cls needs at least two different labels"):
        load_classification(str(one))
    two = write(tmp_path / "two.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    test = write(tmp_path / "test.jsonl", [{"text": "x", "label": "a"}, {"text": "z", "label": "c"}])
    with pytest.raises(DataError, match=r"test.jsonl:2: label 'c' is not among the training labels \(a, b\)"):
        load_classification(str(two), test=str(test))


def test_encoding_adds_special_tokens_truncates_and_indexes_labels() -> None:
    class Tok:  # whitespace "tokenizer" with [CLS]=1 ... [SEP]=2 around the words
        def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, verbose=True):
            ids = [1] + [10 + len(w) for w in text.split()] + [2]
            if truncation and max_length and len(ids) > max_length:
                ids = ids[: max_length - 1] + [2]
            return {"input_ids": ids}

    rows = [{"text": "a bb", "label": "y"}, {"text": "a b c d e f g h i j", "label": "x"}]
    examples, truncated = encode_classification(Tok(), rows, ["x", "y"], 8)
    assert examples[0] == {"input_ids": [1, 11, 12, 2], "label": 1}
    assert len(examples[1]["input_ids"]) == 8 and examples[1]["label"] == 0 and truncated == 1
