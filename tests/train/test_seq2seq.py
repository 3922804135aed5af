"""Task seq2seq on a tiny random T5 (character tokenizer): the prompt feeds the encoder, the response is the
decoder's labels (shifted by the model, not by us). LoRA and prompt tuning train through the same loop, survive
save -> load, and generation through peftkit equals a greedy decode written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli.main import main
from peftkit.data.template import Template
from peftkit.eval.generate import generate
from peftkit.models.load import detect_task, load_for_eval
from peftkit.runs.config import load_config
from peftkit.runs.run import prepare, train_run
from peftkit.runs.task_types import encode_seq2seq
from peftkit.train.loop import Batching, Trainer, Wiring
from peftkit.train.loss import SEQ2SEQ_OBJECTIVE, evaluate_loss, seq2seq_collate
from tests.tiny_text import t5_folder

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 8
METHODS = {  # method overrides and a learning rate that moves the tiny model in a few steps
    "lora": (["method.name=lora", "method.r=8", "method.target_modules=all-linear"], 3e-2),
    "prompt_tuning": (["method.name=prompt_tuning", "method.num_virtual_tokens=4"], 1e-1),
}


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return t5_folder(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("s2s-data") / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def config(t5_dir: Path, data: Path, out: Path, method: str, *extra: str):
    overrides, lr = METHODS[method]
    return load_config(None, [f"model={t5_dir}", "task=seq2seq", f"data.train={data}", f"data.validation={data}",
                              f"output_dir={out}", "train.batch_size=8", "train.max_steps=15", f"train.lr={lr}",
                              "train.schedule=constant", "train.warmup_steps=0", "train.eval_every=0",
                              "train.save_every=0", "train.precision=fp32", *overrides, *extra])


def greedy_by_hand(model: torch.nn.Module, prompt: list[int], eos: int, max_new: int, stop: bool = True) -> list[int]:
    """Greedy decoding with plain forward calls: the whole decoder input each step, no cache, no generate().
    ``stop=False`` never picks eos (a full-length continuation even from a model that would stop at once)."""
    enc = torch.tensor([prompt])
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=torch.tensor([dec]),
                           use_cache=False).logits[0, -1]  # (V,)
            if not stop:
                logits[eos] = float("-inf")
            dec.append(int(logits.argmax()))
            if dec[-1] == eos:
                break
    return dec[1:]


def test_encoding_puts_the_prompt_in_the_encoder_and_the_response_in_the_labels(t5_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t5_dir)
    template = Template.create(tok, "auto", "alpaca")
    enc = encode_seq2seq(template, ROWS[:1], 256).examples[0]
    prompt = tok.decode(enc["input_ids"], skip_special_tokens=True)
    assert "instruction" in prompt and "grass" in prompt and "green" not in prompt and tok.unk_token_id not in enc["input_ids"]
    assert enc["input_ids"][-1] == tok.eos_token_id  # the tokenizer's own </s> closes the encoder input
    assert enc["labels"] == tok("green", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_loss_is_the_models_own_shifted_loss(t5_dir: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    batch = seq2seq_collate([{"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]}, {"input_ids": [5, 1], "labels": [10, 1]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]] and batch["labels"].tolist()[1] == [10, 1, -100]
    with torch.no_grad():
        loss, n = SEQ2SEQ_OBJECTIVE.loss_sum(model, batch)
        reference = model(**batch).loss  # transformers' mean cross-entropy over labels != -100
    assert n == 5 and float(loss) / n == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trains_round_trips_and_generates(method: str, t5_dir: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = config(t5_dir, data_file, tmp_path, method)
    prep = prepare(cfg)
    model, tok = prep.model, prep.tokenizer
    assert type(model).__name__ == "T5ForConditionalGeneration"
    data = prep.task.encode(prep.template, tok, ROWS, cfg, prep.splits).examples
    before = evaluate_loss(model, data[:8], 8, tok.pad_token_id, objective=SEQ2SEQ_OBJECTIVE)
    Trainer(model, data, [], cfg.train, Batching(tok.pad_token_id),
            Wiring(tmp_path, objective=SEQ2SEQ_OBJECTIVE, show_progress=False)).fit()
    after = evaluate_loss(model, data[:8], 8, tok.pad_token_id, objective=SEQ2SEQ_OBJECTIVE)
    assert after < before - 0.05, (before, after)

    peftkit.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    assert detect_task(str(t5_dir), str(tmp_path / "adapter")) == "seq2seq"
    fresh, _ = load_for_eval(str(t5_dir), str(tmp_path / "adapter"))
    assert evaluate_loss(fresh, data[:8], 8, tok.pad_token_id, objective=SEQ2SEQ_OBJECTIVE) == pytest.approx(after, abs=1e-5)

    examples = [ROWS[i] for i in range(4)]
    ours = generate(fresh, prep.template, examples, max_new_tokens=6, batch_size=1)
    by_hand = [tok.decode(greedy_by_hand(fresh, prep.template.prompt_ids(ex), tok.eos_token_id, 6),
                          skip_special_tokens=True).strip() for ex in examples]
    assert ours == by_hand
    # model.generate (KV cache, the soft prompt added once through the encoder) = the by-hand loop, token by token
    prompt = prep.template.prompt_ids(examples[0])
    with torch.no_grad():
        out = fresh.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out[0, 1:].tolist() == greedy_by_hand(fresh, prompt, tok.eos_token_id, 6, stop=False)
    if method == "lora":  # equal-length prompts aside, left padding must not change what LoRA generates
        assert generate(fresh, prep.template, examples, max_new_tokens=6, batch_size=4) == ours


def test_pipeline_run_and_generate_cli(t5_dir: Path, data_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    summary = train_run(config(t5_dir, data_file, tmp_path / "run", "lora", "train.eval_every=5"),
                        show_progress=False, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert summary["task"] == "seq2seq" and len(losses) == 3 and losses[-1] < losses[0]
    capsys.readouterr()
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["generate", "--model", str(t5_dir), "--adapter", adapter, "--prompt", "Say the color of grass",
                 "--template", "alpaca", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tok = load_for_eval(str(t5_dir), adapter)
    template = Template.create(tok, "alpaca")
    assert printed == generate(model, template, [ROWS[0]], max_new_tokens=6)[0]


def test_plain_text_data_is_refused(t5_dir: Path, tmp_path: Path) -> None:
    from peftkit.errors import ConfigError

    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "just some text"}) + "\n")
    with pytest.raises(ConfigError, match="task seq2seq needs prompt -> response data"):
        prepare(load_config(None, [f"model={t5_dir}", "task=seq2seq", f"data.train={text}"]))
