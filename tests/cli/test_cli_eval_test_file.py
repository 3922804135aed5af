"""Issue #23: `peftkit eval --test FILE` scores a dedicated test file whole (without it: the seeded 10% held out of
--data); `peftkit train` says where its test split comes from."""

import json
import re

import pytest

from peftkit.cli.main import build_parser, main

COLORS = [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]
ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c} for w, c in COLORS] * 6  # 24 rows
TEST_ROWS = [{"instruction": f"Name thing number {i}", "input": "", "output": f"thing{i}"} for i in range(5)]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_eval_test_file_is_scored_whole_and_without_it_the_held_out_rows(tiny_lm_dir, tmp_path, capsys):
    data, test = write(tmp_path / "data.jsonl", ROWS), write(tmp_path / "test.jsonl", TEST_ROWS)
    preds = tmp_path / "preds.jsonl"
    common = ["eval", "--model", str(tiny_lm_dir), "--data", str(data), "--max-new-tokens", "2", "--json"]

    code, out, err = run(capsys, [*common, "--test", str(test), "--predictions", str(preds)])
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == len(TEST_ROWS) and res["split"] == "test" and res["test_source"] == f"test file {test}"
    assert err == [f"peftkit: {data}: test file {test}"]
    scored = [json.loads(line)["reference"] for line in preds.read_text().splitlines()]
    assert sorted(scored) == sorted(r["output"] for r in TEST_ROWS)  # every row of the file, nothing of --data

    code, out, err = run(capsys, common)  # no --test: the seeded 10% of --data that training leaves out
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == 2 and "held out as the test split" in res["test_source"]
    assert len(err) == 1 and "no test file: 2 of the 24 rows" in err[0]

    code, out, _ = run(capsys, [*common, "--test", str(test), "--limit", "3"])  # --limit applies to the file
    assert code == 0 and json.loads(out)["n"] == 3


def test_eval_test_file_for_multiple_choice(tiny_lm_dir, tmp_path, capsys):
    def mc(i):
        return {"question": f"Question {i}?", "choices": ["a", "b", "c"], "answer": i % 3}

    data, test = write(tmp_path / "mc.jsonl", [mc(i) for i in range(6)]), write(tmp_path / "mc_test.jsonl",
                                                                                [mc(i) for i in range(6, 9)])
    code, out, err = run(capsys, ["eval", "--model", str(tiny_lm_dir), "--data", str(data), "--test", str(test),
                                  "--shots", "1", "--json"])
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "multiple_choice" and res["n"] == 3 and res["test_source"] == f"test file {test}"


@pytest.mark.parametrize("options, pattern", [
    (["--test", "{tmp}/missing.jsonl"], r"--test file not found: .*missing.jsonl"),
    (["--test", "{test}", "--split", "train"], r"--test FILE is the test split; it does not apply to --split train"),
    (["--test", "{test}", "--task", "perplexity"], r"--test does not apply to perplexity"),
    (["--test", "{test}", "--data", "{tmp}/general.txt"], r"--test does not apply to perplexity"),
    (["--test", "{test}", "--forgetting", "--base", "x"], r"--test does not apply to --forgetting"),
])
def test_eval_test_file_bad_options_are_one_line(options, pattern, tiny_lm_dir, tmp_path, capsys):
    test = write(tmp_path / "test.jsonl", TEST_ROWS)
    argv = ["eval", "--model", str(tiny_lm_dir), *[o.format(tmp=tmp_path, test=test) for o in options]]
    code, _, err = run(capsys, argv)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("peftkit: error: ") and re.search(pattern, err[0]), err


def test_eval_test_file_help_says_what_happens_without_it():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    text = " ".join(commands.choices["eval"].format_help().split())
    assert "--test FILE a dedicated test file, scored whole as the test split" in text
    assert "without it the test split is the 10% of a --data file" in text and "(default: None)" not in text


def test_train_logs_where_the_test_split_comes_from(tiny_lm_dir, tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", ROWS)
    args = ["train", f"model={tiny_lm_dir}", f"data.train={data}", "method.r=4", "train.max_steps=1",
            "train.batch_size=4", "train.eval_every=0", "train.save_every=0"]
    assert main([*args, f"output_dir={tmp_path / 'held'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    data_at = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[data_at + 1] == (f"test split: no test file: 2 of the 24 rows of {data} held out as the test split "
                                  "(seeded; training leaves them out)"), lines
    assert "data: 21 train / 1 validation examples" in lines[data_at]  # 24 - 2 held out, 5% of 24 for validation

    test = write(tmp_path / "test.jsonl", TEST_ROWS)
    assert main([*args, f"data.test={test}", f"output_dir={tmp_path / 'file'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"test split: test file {test}" in lines

    small = write(tmp_path / "small.jsonl", ROWS[:8])  # under 20 rows: nothing held out, nothing said
    assert main([*args, f"data.train={small}", f"output_dir={tmp_path / 'small'}"]) == 0
    assert not any(line.startswith("test split:") for line in capsys.readouterr().out.splitlines())
