"""Preference runs end to end on a tiny model with the real tokenizer: DPO raises held-out preference accuracy,
a resumed run ends equal to an uninterrupted one (both reference kinds), SFT then DPO starts from rewards of 0
(the reference is the SFT adapter), and the objective must fit the data."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import ConfigError
from peftkit.runs.config import load_config
from peftkit.runs.run import train_run

COLOURS = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("blood", "red")]


def _pairs(n: int, start: int = 0) -> list[dict[str, str]]:
    rows = []
    for i in range(start, start + n):
        thing, colour = COLOURS[i % 5]
        rows.append({"prompt": f"What colour is {thing}? (#{i})", "chosen": colour, "rejected": COLOURS[(i + 2) % 5][1]})
    return rows


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(60)))
    return path


def _run(tiny_lm_dir, pref_file, out: Path, *extra: str, resume: bool = False) -> dict:
    os.environ["PEFTKIT_TENSORBOARD"] = "0"
    cfg = load_config(None, [f"model={tiny_lm_dir}", f"data.train={pref_file}", f"output_dir={out}", "overwrite=true",
                             "train.max_steps=20", "train.batch_size=4", "train.lr=5e-3", "train.warmup_steps=0",
                             "train.log_every=1", "train.eval_every=0", "train.save_every=10", "train.threads=1",
                             "data.validation_fraction=0", *extra])
    return train_run(cfg, resume=resume, show_progress=False, log=lambda *a, **k: None)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _accuracy(model_dir, adapter: Path | None) -> float:
    from peftkit.data.formats import validate
    from peftkit.data.template import Template
    from peftkit.eval.preference import preference_accuracy
    from peftkit.models import load_model

    model, tok = load_model(str(model_dir))
    if adapter is not None:
        import peftkit

        peftkit.load_adapter(model, adapter)
    rows = _pairs(40, start=60)  # held out: prompts never trained on
    validate(rows, [f"row {i}" for i in range(len(rows))], "preference")
    return preference_accuracy(model, Template.create(tok, "auto", "preference"), rows)["preference_accuracy"]


def test_dpo_raises_held_out_preference_accuracy(tiny_lm_dir, pref_file, tmp_path):
    summary = _run(tiny_lm_dir, pref_file, tmp_path / "dpo", "train.max_steps=60", "train.lr=1e-2",
                   "method.target_modules=all-linear")
    rows = _metrics(tmp_path / "dpo")
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base: policy == reference
    assert rows[-1]["rewards/accuracies"] > 0.6 and rows[-1]["loss"] < rows[0]["loss"]
    before, after = _accuracy(tiny_lm_dir, None), _accuracy(tiny_lm_dir, tmp_path / "dpo" / "adapter")
    assert after >= 0.8 and after >= before + 0.2, (before, after)
    assert summary["steps"] == 60


def test_a_resumed_dpo_run_ends_equal_to_an_uninterrupted_one(tiny_lm_dir, pref_file, tmp_path, monkeypatch):
    """With the reference precomputed (a method that trains base tensors): the resumed run computes it again from
    the starting model, not from the checkpoint's, and ends equal (the adapters-off reference has nothing kept)."""
    method = ["method.name=selective", "method.kinds=[norm]"]
    _run(tiny_lm_dir, pref_file, tmp_path / "whole", *method)
    from peftkit.train.loop import Trainer

    real = Trainer._after_step

    def stop_at_12(self, *a, **k):
        real(self, *a, **k)
        if self.state.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # the run checkpoints step 12 and stops

    monkeypatch.setattr(Trainer, "_after_step", stop_at_12)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_lm_dir, pref_file, tmp_path / "cut", *method)
    monkeypatch.setattr(Trainer, "_after_step", real)
    _run(tiny_lm_dir, pref_file, tmp_path / "cut", *method, resume=True)
    name = "adapter" if (tmp_path / "whole" / "adapter").exists() else "model"
    a = load_file(str(next((tmp_path / "whole" / name).glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "cut" / name).glob("*.safetensors"))))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sft_then_dpo_uses_the_sft_adapter_as_reference(tiny_lm_dir, pref_file, tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in _pairs(40)))
    os.environ["PEFTKIT_TENSORBOARD"] = "0"
    cfg = load_config(None, [f"model={tiny_lm_dir}", f"data.train={sft}", f"output_dir={tmp_path / 'a'}",
                             "train.max_steps=10", "train.batch_size=4", "train.lr=5e-3", "train.eval_every=0",
                             "train.save_every=0", "data.template=chat", "data.validation_fraction=0"])
    train_run(cfg, show_progress=False, log=lambda *a, **k: None)
    _run(tiny_lm_dir, pref_file, tmp_path / "b", f"init_adapter={tmp_path / 'a' / 'adapter'}", "train.max_steps=2")
    first = _metrics(tmp_path / "b")[0]
    # the policy starts as the SFT adapter and so does the reference: rewards 0, although the SFT adapter already
    # prefers the chosen answers over the base model's choice (LLaMA-Factory#8974: a base-model reference)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_the_objective_must_fit_the_data(tiny_lm_dir, pref_file, tmp_path):
    with pytest.raises(ConfigError, match="train.objective=sft on preference data"):
        _run(tiny_lm_dir, pref_file, tmp_path / "x", "train.objective=sft")
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    with pytest.raises(ConfigError, match="trains on preference pairs"):
        _run(tiny_lm_dir, alpaca, tmp_path / "y", "train.objective=ipo")
