"""Evaluation scores each example against its own answer, on rows no run trained on, with shots that are not
the query."""

import json

import pytest

import peftkit.eval.scoring as tasks
from peftkit.data.load import TEST_FRACTION, load_splits
from peftkit.data.template import reference
from peftkit.errors import DataError
from peftkit.eval.icl import draw_shots
from peftkit.eval.scoring import evaluate


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Answer with the number."},
                         {"role": "user", "content": f"What is {i} + 1?"},
                         {"role": "assistant", "content": f"{i + 1}"}]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stub_generate(answer_for):
    """A stand-in for generation that sees only the rendered prompt and answers from it."""
    seen = []

    def fake(model, template, examples, **kw):
        prompts = [template.prompt_text(ex) for ex in examples]
        seen.extend(prompts)
        return [answer_for(p) for p in prompts]

    return fake, seen


def test_reference_is_the_formats_own_answer():
    assert reference(chat_row(2)) == "3"
    multi = {"messages": chat_row(2)["messages"] + [{"role": "user", "content": "x"},
                                                    {"role": "assistant", "content": "last"}]}
    assert reference(multi) == "last"
    assert reference({"prompt": "2+2=", "completion": "4"}) == "4"
    assert reference({"instruction": "Say hi", "output": "hi"}) == "hi"
    for bad in ({"messages": [{"role": "user", "content": "x"}]}, {"instruction": "Say hi", "output": ""},
                {"prompt": "x"}):
        with pytest.raises(DataError, match="no reference answer"):
            reference(bad)


def test_chat_eval_scores_against_the_last_assistant_turn(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(3)])

    def right(prompt):  # a model that knows the sums; its prompt must not contain the answer turn
        assert prompt.endswith("<|im_start|>assistant\n") and prompt.count("<|im_start|>assistant") == 1
        i = int(prompt.split("What is ")[1].split(" +")[0])
        return str(i + 1)

    fake, seen = stub_generate(right)
    monkeypatch.setattr(tasks, "generate", fake)
    res = evaluate(model, tok, data, predictions_file=tmp_path / "p.jsonl", log=lambda m: None)
    assert res["n"] == 3 and len(seen) == 3
    assert res["exact_match"] == pytest.approx(1.0) and res["token_f1"] == pytest.approx(1.0)
    refs = sorted(json.loads(x)["reference"] for x in (tmp_path / "p.jsonl").read_text().splitlines())
    assert refs == ["1", "2", "3"]

    fake, _ = stub_generate(lambda p: "")  # a model that says nothing scores nothing
    monkeypatch.setattr(tasks, "generate", fake)
    res = evaluate(model, tok, data, log=lambda m: None)
    assert res["exact_match"] == 0.0 and res["token_f1"] == 0.0


def test_chat_eval_with_shots_prompts_with_earlier_solved_turns(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(4)])
    fake, seen = stub_generate(lambda p: "?")
    monkeypatch.setattr(tasks, "generate", fake)
    evaluate(model, tok, data, shots=3, log=lambda m: None)
    for prompt in seen:  # three other solved questions, then the query, never the query solved
        asked = prompt.rsplit("What is ", 1)[1].split(" +")[0]
        assert prompt.count("<|im_start|>assistant") == 4 and prompt.count(f"What is {asked} +") == 1


def test_draw_shots_never_draws_the_query():
    train = [{"instruction": "q", "input": str(i), "output": "positive" if i % 2 else "negative"} for i in range(6)]
    for query in train:
        for options in (None, ["negative", "positive"]):
            shots = draw_shots(train, 5, seed=0, options=options, exclude=dict(query))
            assert query not in shots and len(shots) >= 4


def test_a_single_file_holds_out_a_seeded_test_split(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    rows = [{"instruction": f"Add one to {i}", "output": str(i + 1)} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    held = load_splits(data).test
    assert len(held) == int(40 * TEST_FRACTION)
    for seed in (0, 7):  # whatever seed a run trains with, it never sees the held-out rows
        s = load_splits(data, validation_fraction=0.1, seed=seed)
        assert s.test == held and not [r for r in s.train + s.validation if r in held]
        assert len(s.train) + len(s.validation) + len(s.test) == 40

    fake, seen = stub_generate(lambda p: "1")
    monkeypatch.setattr(tasks, "generate", fake)
    logged = []
    res = evaluate(model, tok, data, shots=2, log=logged.append)
    assert res["n"] == len(held)
    asked = sorted(p.rsplit("Add one to ", 1)[1].split("<")[0].strip() for p in seen)
    assert asked == sorted(r["instruction"].split()[-1] for r in held)
    assert "held out as the test split" in res["test_source"] and "held out" in logged[0]
    # a test file is scored whole
    test = write_jsonl(tmp_path / "t.jsonl", rows[:25])
    res = evaluate(model, tok, data, test=test, log=logged.append)
    assert res["n"] == 25 and res["test_source"] == f"test file {test}"


def test_compare_scores_the_held_out_rows(monkeypatch, tmp_path):
    from peftkit.runs.compare import CompareConfig, _test_args
    from peftkit.runs.config import DataConfig

    cfg = CompareConfig(data=DataConfig(train=str(tmp_path / "d.jsonl"), test=None))
    assert _test_args(cfg)["test"] is None  # evaluate holds out of data.train
    cfg = CompareConfig(data=DataConfig(train=str(tmp_path / "d.jsonl"), test=str(tmp_path / "t.jsonl")))
    assert _test_args(cfg)["test"] == str(tmp_path / "t.jsonl")
