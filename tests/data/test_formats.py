import json

import pytest

from peftkit.data.formats import detect_format, read_records, validate
from peftkit.data.load import load_splits
from peftkit.errors import DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_reads_rows_and_reports_malformed_line(tmp_path):
    good = write(tmp_path / "a.jsonl", '{"text": "x"}\n\n{"text": "y"}\n')
    rows, where = read_records(good)
    assert [r["text"] for r in rows] == ["x", "y"]
    assert where[1].endswith("a.jsonl:3")
    bad = write(tmp_path / "b.jsonl", '{"text": "x"}\n{"text": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: malformed JSON"):
        read_records(bad)


def test_json_list_csv_and_parquet(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    j = write(tmp_path / "d.json", json.dumps(rows))
    assert read_records(j)[0] == rows
    c = write(tmp_path / "d.csv", "prompt,completion\np1,c1\np2,c2\n")
    got, where = read_records(c)
    assert got == rows and where[0].endswith("line 2")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert read_records(tmp_path / "d.parquet")[0] == rows


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".jsonl", "data file not found"),
        ("", ".jsonl", "no examples"),
        ('[1, 2]', ".json", "item 0 is a int"),
        ('{"a": 1}', ".json", "expected a JSON list"),
        ("x", ".txt", "unsupported file type"),
        ('[1]\n', ".jsonl", "expected a JSON object"),
    ],
)
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"f{suffix}"
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_non_utf8(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(path)


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "chat"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt
    assert validate([row], ["x:1"], "auto") == fmt


def test_detect_format_unknown_fields():
    with pytest.raises(DataError, match="cannot tell the data format"):
        detect_format({"question": "q"}, "f.jsonl:1")


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"instruction": "i"}, "alpaca", r"f:7: missing field 'output'"),
        ({"instruction": "i", "output": 3}, "alpaca", "field 'output' must be a string, got int"),
        ({"instruction": "i", "output": "  "}, "alpaca", "field 'output' is empty"),
        ({"messages": []}, "chat", "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "chat", r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "last message must be the assistant"),
        ({"prompt": "p"}, "prompt_completion", "missing field 'completion'"),
    ],
)
def test_validate_errors_name_row_and_field(row, fmt, message):
    with pytest.raises(DataError, match=message):
        validate([row], ["f:7"], fmt)


def test_user_file_gets_seeded_validation_split(tmp_path):
    path = tmp_path / "t.jsonl"
    write(path, "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40)))
    a = load_splits(str(path), validation_fraction=0.1, seed=3)
    b = load_splits(str(path), validation_fraction=0.1, seed=3)
    assert len(a.validation) == 4 and len(a.train) == 36
    assert a.validation == b.validation
    assert not {r["text"] for r in a.validation} & {r["text"] for r in a.train}


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_splits("no-such-dataset")
