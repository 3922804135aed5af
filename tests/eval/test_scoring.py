import json
import math

import pytest
import torch

from peftkit.data.template import Template
from peftkit.errors import DataError
from peftkit.eval.icl import draw_shots, with_shots
from peftkit.eval.scoring import evaluate, perplexity

TRAIN = [{"instruction": "Sentiment?", "input": f"review {i}", "output": "positive" if i % 2 else "negative"}
         for i in range(10)]


def test_draw_shots_balanced_and_seeded():
    shots = draw_shots(TRAIN, 4, seed=1, options=["negative", "positive"])
    assert sorted(s["output"] for s in shots) == ["negative", "negative", "positive", "positive"]
    assert shots == draw_shots(TRAIN, 4, seed=1, options=["negative", "positive"])
    assert draw_shots(TRAIN, 0) == []


def test_with_shots_renders_as_earlier_turns(tokenizer):
    t = Template.create(tokenizer)
    query = {"instruction": "Sentiment?", "input": "great", "output": "positive"}
    ex = with_shots(query, TRAIN[:2])
    prompt = t.prompt_text(ex)
    # two solved turns, then the query, then the assistant header
    assert prompt.count("<|im_start|>user") == 3 and prompt.count("<|im_start|>assistant") == 3
    assert prompt.index("review 0") < prompt.index("review 1") < prompt.index("great")
    assert "negative<|im_end|>" in prompt and "positive<|im_end|>" in prompt
    assert t.response_text(ex).startswith("positive<|im_end|>")
    pc = with_shots({"prompt": "2+2=", "completion": "4"}, [{"prompt": "1+1=", "completion": "2"}])
    assert pc["prompt"] == "1+1=2\n\n2+2="


def test_multiple_choice_file_known_answer(tiny_lm, tmp_path, monkeypatch):
    """Force the model to prefer letter B: every question's answer B scores 1.0, answer A scores 0.0."""
    model, tok = tiny_lm
    rows = [{"question": f"Q{i}?", "choices": ["x", "y", "z"], "answer": ans} for i, ans in enumerate(["B", 1, "b"])]
    rows.append({"question": "Q?", "A": "x", "B": "y", "answer": "A"})
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b_id = tok("B", add_special_tokens=False)["input_ids"][0]
    real_forward = model.forward

    def biased(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits[..., b_id] += 100.0
        return out

    monkeypatch.setattr(model, "forward", biased)
    res = evaluate(model, tok, str(path), predictions_file=tmp_path / "p.jsonl")
    assert res["task"] == "multiple_choice" and res["n"] == 4
    assert res["accuracy"] == pytest.approx(0.75)  # the three B's right, the A wrong
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds].count("B") == 4
    assert "A. x\nB. y" in preds[0]["prompt"] or "A. x\nB. y" in preds[1]["prompt"]


def test_multiple_choice_bad_answer(tiny_lm, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "Q", "choices": ["x", "y"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match=r"mc.jsonl:1: 'answer' must be a letter A-B"):
        evaluate(model, tok, str(path))


def test_generation_task_scores_predictions(tiny_lm, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ["hi", "yo", "ok"]))
    res = evaluate(model, tok, str(path), task="generation", max_new_tokens=3, predictions_file=tmp_path / "p.jsonl")
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    refs = [json.loads(x)["reference"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    from peftkit.eval.metrics import generation_metrics

    assert res["n"] == 3 and sorted(refs) == ["hi", "ok", "yo"]
    for k, v in generation_metrics(preds, refs).items():
        assert res[k] == pytest.approx(v)


def test_perplexity_windows_score_each_token_once(tiny_lm, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    ids = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    full = perplexity(model, tok, str(path), window=len(ids), stride=len(ids))
    windowed = perplexity(model, tok, str(path), window=64, stride=32)
    assert full["tokens"] == windowed["tokens"] == len(ids) - 1
    # less context per token can only change the score a little on repetitive text; the count is exact
    assert math.isfinite(windowed["perplexity"]) and windowed["perplexity"] > 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert full["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
