"""The data loaders, attacked as a hostile user would: random bytes, wrong encodings, huge lines, deep
nesting, wrong types, empty strings, missing and unknown keys. Every case ends in success (and the rows
then tokenize) or a one-line DataError (exit code 2 from the CLI), never a traceback, hang or partial file."""

import json
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from peftkit.cli.main import main
from peftkit.data.formats import FORMATS
from peftkit.data.load import load_file
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.errors import DataError
from tests.fuzz.common import FUZZ, assert_cli_error, fresh_dir, run_cli, succeeds_or_clean_error

KEYS = ["instruction", "input", "output", "system", "messages", "prompt", "completion", "text", "role", "content", "extra"]
text = st.text(st.characters(codec=None), max_size=40)  # any code point, lone surrogates included
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True), text)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | text, c, max_size=4),
                      max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot", ""]), "content": text | scalars})
row = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), values, max_size=5),
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": text | scalars, "extra": values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    st.fixed_dictionaries({"prompt": text, "completion": text | scalars}),
    st.fixed_dictionaries({"text": text | scalars}),
    values,
)


def tmpfile(suffix: str, data: bytes) -> Path:
    d = fresh_dir()
    path = d / f"data{suffix}"
    path.write_bytes(data)
    return path


def load_and_encode(path: Path, fmt: str, tokenizer) -> None:
    """What a training run does with a data file before the model sees it."""
    def go():
        rows, detected = load_file(str(path), fmt)
        for template in ("auto", "alpaca", "none"):
            encode_all(Template.create(tokenizer, template, detected), rows, 32)

    return succeeds_or_clean_error(go)


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".jsonl", ".json"]), fmt=st.sampled_from(["auto", *FORMATS]))
@example(data=b"\xff\xfe{\x00}\x00", suffix=".jsonl", fmt="auto")  # UTF-16
@example(data='{"text": "caf\xe9"}\n'.encode("latin-1"), suffix=".jsonl", fmt="auto")
@example(data=b'\xef\xbb\xbf{"text": "with a BOM"}\n', suffix=".jsonl", fmt="auto")
@example(data=b"\x00" * 100, suffix=".json", fmt="auto")
@example(data=b"", suffix=".jsonl", fmt="auto")
def test_random_bytes(tokenizer, data, suffix, fmt):
    load_and_encode(tmpfile(suffix, data), fmt, tokenizer)


@FUZZ
@given(rows=st.lists(row, max_size=5), as_list=st.booleans(), fmt=st.sampled_from(["auto", *FORMATS]))
@example(rows=[{"instruction": "", "output": ""}], as_list=False, fmt="auto")
@example(rows=[{"instruction": "x", "output": "\ud800"}], as_list=False, fmt="auto")
@example(rows=[{"messages": [{"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "a"}]}], as_list=True, fmt="auto")
@example(rows=[{"text": ""}], as_list=False, fmt="text")
@example(rows=[{"prompt": "p"}], as_list=False, fmt="auto")
@example(rows=[{"unknown": 1, "instruction": "i", "output": "o"}], as_list=True, fmt="alpaca")
def test_structured_rows(tokenizer, rows, as_list, fmt):
    if as_list:
        data = json.dumps(rows).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    load_and_encode(tmpfile(".json" if as_list else ".jsonl", data), fmt, tokenizer)


@pytest.mark.parametrize("suffix, data, match", [
    (".jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n", "nested too deeply"),
    (".json", b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (".jsonl", b'{"text": ' + b"9" * 10_000 + b"}\n", "unreadable JSON value"),
    (".jsonl", b'{"instruction": "i", "output": ' + b'"' + b"a" * 5_000_000 + b'"', "malformed JSON"),
    (".json", '[{"text": "x"}]'.encode("utf-16"), "not UTF-8"),
    (".jsonl", b'{"instruction": "i", "output": NaN}\n', "must be a string"),
])
def test_hostile_files(tokenizer, suffix, data, match):
    with pytest.raises(DataError, match=match):
        load_file(str(tmpfile(suffix, data)))


def test_huge_valid_line_loads(tokenizer):
    path = tmpfile(".jsonl", json.dumps({"instruction": "i " * 1_000_000, "output": "o"}).encode() + b"\n")
    rows, fmt = load_file(str(path))
    enc = encode_all(Template.create(tokenizer, "auto", fmt), rows, 64)
    assert enc.truncated == 1 and len(enc.examples[0]["input_ids"]) == 64


@pytest.mark.parametrize("suffix, data", [
    (".csv", b"\x00\xff\xfe garbage \x00\n\x01,\x02\n"),
    (".csv", b"instruction,output\n1,2\n"),
    (".csv", b"instruction,output\n"),
    (".csv", b"instruction,output\nhello,\n"),
    (".parquet", b"PAR1 not really parquet"),
])
def test_hostile_tabular(tokenizer, suffix, data):
    assert isinstance(load_and_encode(tmpfile(suffix, data), "auto", tokenizer), DataError)


@pytest.mark.parametrize("name", ["", " ", "x\0y.jsonl", "a" * 5000 + ".jsonl", "a" * 5000, "\n.jsonl", "/dev/null/x.jsonl"])
def test_hostile_paths(name, tmp_path, capsys):
    code = main(["train", f"data.train={name}", f"model={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'out'}"])
    line = assert_cli_error(code, capsys.readouterr().err)
    assert len(line) < 2100
    assert not (tmp_path / "out").exists()


@given(data=st.binary(max_size=2000) | st.lists(row, max_size=3).map(lambda r: "".join(json.dumps(x) + "\n" for x in r).encode("utf-8", "surrogatepass")))
@FUZZ.__class__(FUZZ, max_examples=25)
def test_cli_train_on_fuzzed_data(capsys, data):
    """Through the real command: always exit 2 with one line (the model does not exist, so valid data stops
    there), and nothing is written to output_dir."""
    path = tmpfile(".jsonl", data)
    out = path.parent / "out"
    code = main(["train", f"data.train={path}", f"model={path.parent / 'no-model'}", f"output_dir={out}"])
    assert_cli_error(code, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("data", [b"\xff" * 100, b"[" * 100_000 + b"\n"])
def test_cli_subprocess_exit_code(tmp_path, data):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    r = run_cli(["train", f"data.train={path}", f"model={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'out'}"], str(tmp_path))
    assert "Traceback" not in r.stderr
    assert_cli_error(r.returncode, r.stderr)
    assert not (tmp_path / "out").exists()
