"""The lm-eval bridge: log-likelihoods equal lm-eval's own HFLM on the same (adapted) model, and peftkit's label
scoring for soft prompts (which HFLM has no path for); generation stops at ``until``; the shipped tasks run offline
for an adapter and its base, side by side."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (requirements/test.txt)")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from peftkit import LoraConfig, PromptTuningConfig, inject, save_adapter
from peftkit.cli.main import main
from peftkit.errors import ConfigError
from peftkit.eval.harness import harness_report, make_lm, run_tasks
from peftkit.train.loss import lm_loss_sum

PAIRS = [("The cat sat on", " the mat"), ("Review: great fun\nSentiment:", " positive"), ("", "hello world"),
         ("Hi  ", "there"), ("One two three four five", " six seven")]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 12


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _randomize(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_loglikelihoods_equal_hflm_on_a_lora_model(tiny_lm) -> None:
    model, tok = tiny_lm
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize(model)
    model.eval()
    ours = make_lm(model, tok, batch_size=2).loglikelihood(_requests("loglikelihood", PAIRS))
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=2).loglikelihood(_requests("loglikelihood", PAIRS))
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
    rolling = _requests("loglikelihood_rolling", [(TEXT,)])
    ours = make_lm(model, tok, max_length=48).loglikelihood_rolling(rolling)
    theirs = HFLM(pretrained=model, tokenizer=tok, max_length=48).loglikelihood_rolling(rolling)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)


def test_soft_prompts_score_as_peftkit_labels_do(tiny_lm) -> None:
    model, tok = tiny_lm
    inject(model, PromptTuningConfig(num_virtual_tokens=3))
    _randomize(model)
    model.eval()
    ours = make_lm(model, tok).loglikelihood(_requests("loglikelihood", PAIRS[:2]))
    for (context, continuation), (logp, _) in zip(PAIRS[:2], ours, strict=True):
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(ctx) + whole[len(ctx):]])
        with torch.no_grad():
            loss, n = lm_loss_sum(model, {"input_ids": torch.tensor([whole]), "labels": labels,
                                          "attention_mask": torch.ones_like(labels)})
        assert n == len(whole) - len(ctx) and logp == pytest.approx(-float(loss), rel=1e-5)


def test_generate_until_stops_at_the_marker(tiny_lm) -> None:
    model, tok = tiny_lm
    lm = make_lm(model, tok)
    full = lm.generate_until(_requests("generate_until", [("Once upon a time", {"max_gen_toks": 12,
                                                                                "until": ["\u0000never"]})]))[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = lm.generate_until(_requests("generate_until", [("Once upon a time", {"max_gen_toks": 12, "until": [stop]})]))
    assert cut[0] == full[: full.index(stop)]


def test_shipped_tasks_for_adapter_and_base(tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    report = harness_report(model, tok, ["peftkit_rotten_tomatoes", "peftkit_hamlet"], limit=4)
    assert report["base_from"] == "adapters disabled"
    rows = report["tasks"]
    assert set(rows["peftkit_rotten_tomatoes"]) == {"acc"}
    assert set(rows["peftkit_hamlet"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for metrics in rows.values():
        for v in metrics.values():
            assert v["gap"] == pytest.approx(v["adapter"] - v["base"])
    from peftkit.core.adapter import disable_adapters

    with disable_adapters(model):
        base = run_tasks(make_lm(model, tok), ["peftkit_hamlet"], limit=4)["peftkit_hamlet"]
    assert rows["peftkit_hamlet"]["bits_per_byte"]["base"] == pytest.approx(base["bits_per_byte"])
    assert rows["peftkit_hamlet"]["bits_per_byte"]["adapter"] != pytest.approx(base["bits_per_byte"])
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        run_tasks(make_lm(model, tok), ["no_such_task_here"])


def test_cli(tiny_lm, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    model, tok = tiny_lm
    inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize(model)
    save_adapter(model, tmp_path / "adapter")
    argv = ["eval", "--adapter", str(tmp_path / "adapter"), "--harness", "peftkit_rotten_tomatoes", "--limit", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "peftkit_rotten_tomatoes / acc" in out and "adapters disabled = base" in out
    assert main(["eval", "--model", str(tiny_lm_dir), "--harness", "peftkit_hamlet"]) == 2
    assert "--harness scores a fine-tune beside its base" in capsys.readouterr().err
