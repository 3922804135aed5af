"""The forgetting report: before (adapters off / the base) vs after, on held-out general text and other tasks.
Tiny Llama with the real SmolLM2 tokenizer; scores are checked against hand-computed ones."""

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.data.builtin import general_text_path
from peftkit.errors import PeftkitError
from peftkit.eval.forgetting import default_tasks, forgetting_report, format_report
from peftkit.eval.scoring import perplexity
from tests.tiny import perturb_adapters

TOKENS = 96
CHAT_ROWS = [{"instruction": q, "input": "", "output": a} for q, a in
             [("Hello", "Hi there"), ("How are you?", "Fine, thanks"), ("Bye", "See you")]]


def hamlet_ppl(model, tok) -> float:
    return perplexity(model, tok, str(general_text_path()), window=256, stride=256, max_tokens=TOKENS)["perplexity"]


def lora(model, **kw):
    torch.manual_seed(0)
    return peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", **kw))


@pytest.fixture
def chat_file(tmp_path) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return str(path)


def test_forgetting_is_the_hand_computed_perplexity_difference(tiny_lm):
    model, tok = tiny_lm
    before = hamlet_ppl(model, tok)
    lora(model)
    perturb_adapters(model, std=0.3)
    after = hamlet_ppl(model, tok)
    assert after != before
    report = forgetting_report(model, tok, tasks=[], max_tokens=TOKENS)
    s = report["scores"]["perplexity/hamlet"]
    assert report["before_from"] == "adapters disabled"
    assert s["before"] == pytest.approx(before, rel=1e-6) and s["after"] == pytest.approx(after, rel=1e-6)
    assert s["delta"] == pytest.approx(after - before, rel=1e-6)
    assert s["forgetting"] == pytest.approx(after - before, rel=1e-6)  # perplexity: higher = worse
    assert s["relative_change"] == pytest.approx((after - before) / before, rel=1e-6)
    assert s["tokens"] == TOKENS - 1 and s["higher_is_better"] is False
    assert hamlet_ppl(model, tok) == pytest.approx(after)  # adapters are back on afterwards
    assert "perplexity/hamlet" in format_report(report)


def test_an_adapter_that_changes_nothing_forgets_nothing(tiny_lm, chat_file):
    model, tok = tiny_lm
    lora(model)  # LoRA's B starts at zero: the adapted model equals the base exactly
    report = forgetting_report(model, tok, tasks=[chat_file], max_tokens=TOKENS, max_examples=3, max_new_tokens=4)
    assert set(report["scores"]) == {"perplexity/hamlet", "rougeL/chat"}
    for s in report["scores"].values():
        assert s["delta"] == 0.0 and s["forgetting"] == 0.0, s
    assert report["scores"]["rougeL/chat"]["n"] == 3


def test_a_damaging_adapter_shows_positive_forgetting(tiny_lm):
    from peftkit.train.loss import lm_loss_sum

    model, tok = tiny_lm
    lora(model)
    # deliberately damaging: a few steps of gradient *ascent* on general text
    ids = torch.tensor([tok(general_text_path().read_text()[:2000], add_special_tokens=False)["input_ids"][:TOKENS]])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(8):
        loss, n = lm_loss_sum(model, {"input_ids": ids, "labels": ids})
        (-loss / n).backward()
        opt.step()
        opt.zero_grad()
    s = forgetting_report(model, tok, tasks=[], max_tokens=TOKENS)["scores"]["perplexity/hamlet"]
    assert s["after"] > 2 * s["before"] and s["forgetting"] == pytest.approx(s["after"] - s["before"]) and s["forgetting"] > 0


def test_task_accuracy_before_and_after_matches_evaluate(tiny_lm, monkeypatch):
    import functools

    import peftkit.data.builtin as builtin
    from peftkit.core.adapter import disable_adapters
    from peftkit.eval.scoring import evaluate

    monkeypatch.setattr(builtin, "load_builtin", functools.cache(builtin.load_builtin))  # read the corpus once
    model, tok = tiny_lm
    lora(model)
    perturb_adapters(model, std=0.5)
    report = forgetting_report(model, tok, tasks=["rotten-tomatoes"], max_tokens=TOKENS, max_examples=6)
    s = report["scores"]["accuracy/rotten-tomatoes"]
    after = evaluate(model, tok, "rotten-tomatoes", limit=6)["accuracy"]
    with disable_adapters(model):
        before = evaluate(model, tok, "rotten-tomatoes", limit=6)["accuracy"]
    assert (s["before"], s["after"], s["n"]) == (before, after, 6)
    assert s["forgetting"] == pytest.approx(before - after) and s["higher_is_better"] is True  # accuracy: lower = worse


def test_in_place_methods_need_the_base_loaded_separately(tiny_lm, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_lm
    base_ppl = hamlet_ppl(model, tok)
    peftkit.inject(model, peftkit.FullConfig())
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # the "fine-tune" changed base weights themselves
    with pytest.raises(PeftkitError, match="trains the base weights in place.*pass the base model"):
        forgetting_report(model, tok, tasks=[], max_tokens=TOKENS)
    loads = []

    def load_base():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_lm_dir)

    report = forgetting_report(model, tok, tasks=[], max_tokens=TOKENS, base=load_base)
    s = report["scores"]["perplexity/hamlet"]
    assert loads == [1] and report["before_from"] == "separately loaded base model"
    assert s["before"] == pytest.approx(base_ppl, rel=1e-6) and s["after"] == pytest.approx(hamlet_ppl(model, tok))


def test_a_plain_model_without_base_is_refused(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(PeftkitError, match="no adapters to switch off"):
        forgetting_report(model, tok, tasks=[], max_tokens=TOKENS)


def test_default_tasks_are_builtins_the_run_did_not_train_on():
    assert default_tasks(["chatterbot"]) == ["rotten-tomatoes"]
    assert default_tasks(["my.jsonl"]) == ["rotten-tomatoes"]  # classification first: cheap to score
    assert default_tasks(["rotten-tomatoes"]) == ["chatterbot"]
    assert default_tasks(["rotten-tomatoes", "chatterbot"]) == []


def test_cli_eval_forgetting(tiny_lm, tiny_lm_dir, tmp_path, chat_file, capsys):
    from peftkit.cli.main import main

    model, tok = tiny_lm
    lora(model)
    perturb_adapters(model, std=0.3)
    adapter = tmp_path / "adapter"
    peftkit.save_adapter(model, adapter)
    code = main(["eval", "--model", str(tiny_lm_dir), "--adapter", str(adapter), "--forgetting", "--data", chat_file,
                 "--limit", "2", "--forgetting-tokens", str(TOKENS), "--max-new-tokens", "4", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["scores"]) == {"perplexity/hamlet", "rougeL/chat"}
    s = report["scores"]["perplexity/hamlet"]
    assert s["after"] == pytest.approx(hamlet_ppl(model, tok), rel=1e-5)
    assert s["forgetting"] == pytest.approx(s["after"] - s["before"])

    text = tmp_path / "general.txt"  # --data FILE.txt: that text instead of hamlet, no task
    text.write_text(Path(general_text_path()).read_text()[:3000])
    assert main(["eval", "--model", str(tiny_lm_dir), "--adapter", str(adapter), "--forgetting", "--data", str(text),
                 "--forgetting-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "perplexity/general" in out and "forgetting" in out

    assert main(["eval", "--model", str(tiny_lm_dir), "--forgetting"]) == 2
    assert "--forgetting compares a fine-tune with its base" in capsys.readouterr().err
