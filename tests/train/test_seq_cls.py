"""Task seq_cls through the whole pipeline, on a tiny BERT (character tokenizer) and a tiny Llama (SmolLM2's
tokenizer): the head trains with the method and is saved with the adapter as PEFT's ``modules_to_save``;
accuracy at the end of the run and from ``peftkit eval`` agree; the loop stays the method-agnostic one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit.cli.main import main
from peftkit.errors import ConfigError
from peftkit.eval.heads import predict_classes
from peftkit.eval.scoring import evaluate
from peftkit.models.load import LABELS_FILE, detect_task, load_for_eval
from peftkit.runs.config import load_config
from peftkit.runs.run import prepare, train_run
from peftkit.runs.task_types import with_head
from peftkit.train.loss import cls_collate, cls_loss_sum
from tests.tiny_text import bert_folder

POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]
OPENINGS = ["the film was", "this movie is", "acting felt", "plot seemed", "it is"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Reviews whose label is the sentiment word at the end: 100 to train on, 20 to test."""
    rng = random.Random(0)
    rows = [{"text": f"{rng.choice(OPENINGS)} {rng.choice(POSITIVE if i % 2 else NEGATIVE)}",
             "label": "pos" if i % 2 else "neg"} for i in range(120)]
    folder = tmp_path_factory.mktemp("cls-data")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:]))
    return folder / "train.jsonl", folder / "test.jsonl"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("bert-cls"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def config(model: Path, data: tuple[Path, Path], out: Path, method: str, *extra: str):
    return load_config(None, [f"model={model}", "task=seq_cls", f"data.train={data[0]}", f"data.test={data[1]}",
                              f"method.name={method}", f"output_dir={out}", "train.batch_size=16", "train.max_steps=40",
                              "train.schedule=constant", "train.warmup_steps=0", "train.eval_every=20",
                              "train.save_every=0", "train.precision=fp32", *extra])


def eval_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_lora_on_bert_trains_and_saves_the_head_as_modules_to_save(bert_dir: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_run(config(bert_dir, data, out, "lora", "method.r=8", "train.lr=1e-2"), show_progress=False,
                        log=lambda *a: None)
    assert summary["task"] == "seq_cls" and summary["test_examples"] == 20
    assert summary["test_accuracy"] >= 0.9, summary
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert json.loads((adapter / LABELS_FILE).read_text()) == {"labels": ["neg", "pos"]}

    # peftkit eval: the adapter says SEQ_CLS, so the base is loaded with a head of the stored labels
    assert detect_task(str(bert_dir), str(adapter)) == "seq_cls"
    model, tok = load_for_eval(str(bert_dir), str(adapter))
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "neg", 1: "pos"}
    res = evaluate(model, tok, str(data[1]), split="test")
    assert res["task"] == "classification" and res["n"] == 20
    assert res["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_eval_cli_reports_accuracy(bert_dir: Path, data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    train_run(config(bert_dir, data, out, "linear_probe", "train.lr=5e-2", "train.max_steps=5"), show_progress=False,
              log=lambda *a: None)
    capsys.readouterr()
    preds = tmp_path / "preds.jsonl"
    code = main(["eval", "--model", str(bert_dir), "--adapter", str(out / "adapter"), "--data", str(data[1]), "--json",
                 "--predictions", str(preds)])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "run_summary.json").read_text())
    assert res["accuracy"] == pytest.approx(summary["test_accuracy"]) and res["n"] == 20
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 20 and {x["prediction"] for x in lines} <= {"neg", "pos"}


def test_loss_decreases_and_only_method_and_head_train(bert_dir: Path, data, tmp_path: Path) -> None:
    cfg = config(bert_dir, data, tmp_path, "lora", "method.r=4", "train.lr=1e-2")
    model = prepare(cfg).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)
    summary = train_run(cfg, show_progress=False, log=lambda *a: None)
    losses = eval_losses(tmp_path)
    assert losses[-1] < losses[0] and summary["final_eval_loss"] == losses[-1]


def test_linear_probe_trains_only_the_classification_head(bert_dir: Path, data, tmp_path: Path) -> None:
    cfg = config(bert_dir, data, tmp_path / "run", "linear_probe", "train.lr=5e-2", "train.max_steps=10")
    model = prepare(cfg).model
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["classifier.bias", "classifier.weight"]
    train_run(cfg, show_progress=False, log=lambda *a: None)
    keys = set(load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")))
    assert keys == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


@pytest.mark.parametrize("method, extra", [("bitfit", []), ("selective", ["method.kinds=[norm]"]),
                                           ("ia3", []), ("bottleneck_adapter", ["method.size=4"])])
def test_other_methods_carry_the_head_and_round_trip(method: str, extra: list[str], bert_dir: Path, data,
                                                     tmp_path: Path) -> None:
    prep = prepare(config(bert_dir, data, tmp_path, method, *extra))
    model, tok = prep.model, prep.tokenizer
    with torch.no_grad():  # a trained-looking head and method
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    assert model.classifier.weight.requires_grad
    model.eval()
    batch = cls_collate([{"input_ids": tok(t)["input_ids"], "label": 0} for t in ("it is good", "bad")], 0)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peftkit.save_adapter(model, tmp_path / "adapter")
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.classifier.weight" in keys
    fresh, _ = load_for_eval(str(bert_dir), str(tmp_path / "adapter"))
    got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_writes_a_classifier_folder(bert_dir: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_run(config(bert_dir, data, out, "full", "train.lr=3e-3"), show_progress=False, log=lambda *a: None)
    assert summary["output_kind"] == "model" and summary["test_accuracy"] >= 0.9
    model, tok = load_for_eval(str(out / "model"))
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "neg", 1: "pos"}
    assert evaluate(model, tok, str(data[1]))["accuracy"] == pytest.approx(summary["test_accuracy"])


@pytest.mark.parametrize("method", ["prompt_tuning", "llama_adapter"])
def test_methods_that_cannot_carry_a_head_are_refused(method: str, bert_dir: Path, data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"task seq_cls: method {method} cannot train the classification head"):
        prepare(config(bert_dir, data, tmp_path, method))


def test_generation_data_and_packing_are_refused(bert_dir: Path, data, tmp_path: Path) -> None:
    from peftkit.errors import DataError

    with pytest.raises(DataError, match="'chatterbot' has no labels"):
        prepare(load_config(None, [f"model={bert_dir}", "task=seq_cls", "data.train=chatterbot"]))
    with pytest.raises(ConfigError, match="data.packing applies to task causal_lm only, not seq_cls"):
        load_config(None, ["task=seq_cls", "data.packing=true"])
    with pytest.raises(ConfigError, match="task must be one of"):
        load_config(None, ["task=token_cls"])


def test_classification_loss_is_mean_cross_entropy_on_the_head(tiny_bert) -> None:
    from transformers import BertForSequenceClassification

    from tests.tiny import bert_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_labels=3)).eval()
    examples = [{"input_ids": [2, 10, 11, 3], "label": 2}, {"input_ids": [2, 12, 3], "label": 0}]
    batch = cls_collate(examples, 0)
    assert batch["labels"].tolist() == [2, 0] and batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with torch.no_grad():
        loss, n = cls_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert n == 2 and float(loss) == pytest.approx(2 * float(F.cross_entropy(logits, batch["labels"])), rel=1e-6)


# -- a decoder: Llama with a score head -------------------------------------------------------------------------


def test_lora_on_a_llama_decoder_classifies(tiny_lm_dir: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(tiny_lm_dir, data, out, "lora", "method.r=4", "method.target_modules=all-linear", "train.lr=1e-2")
    prep = prepare(cfg)
    model, tok = prep.model, prep.tokenizer
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == tok.pad_token_id
    summary = train_run(cfg, show_progress=False, log=lambda *a: None)
    assert summary["test_accuracy"] >= 0.9, summary
    cfg_file = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_file["modules_to_save"] == ["score"] and cfg_file["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in load_file(str(out / "adapter" / "adapter_model.safetensors"))
    model, tok = load_for_eval(str(tiny_lm_dir), str(out / "adapter"))
    # right padding: the score head reads each row's last real token, so a padded batch = each row alone
    texts = ["the film was good", "bad", "plot seemed awful and dull"]
    assert predict_classes(model, tok, texts) == [predict_classes(model, tok, [t])[0] for t in texts]
    assert evaluate(model, tok, str(data[1]))["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_with_head_on_a_model_without_one(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no classification head"):
        with_head(tiny_llama.build(), peftkit.LoraConfig())


def test_shipped_example_is_valid_and_fits_a_bert() -> None:
    from transformers import BertForSequenceClassification

    from tests.tiny import bert_config

    cfg = load_config(Path(__file__).parents[2] / "examples" / "minilm-rotten-tomatoes-cls.yaml")
    assert (cfg.model, cfg.task, cfg.data.train) == ("minilm-l6", "seq_cls", "rotten-tomatoes")
    method = cfg.method_config()
    assert method.method_name == "lora" and method.target_modules == ["query", "value"]
    model = BertForSequenceClassification(bert_config(num_labels=2))
    peftkit.inject(model, with_head(model, method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "bert.encoder.layer.1.attention.self.value.lora_B.default.weight"} <= trainable


def test_info_and_memory_count_the_head(bert_dir: Path) -> None:
    from peftkit.runs.info import count_for_config
    from peftkit.runs.memory import predict_memory

    overrides = [f"model={bert_dir}", "task=seq_cls", "method.name=linear_probe"]
    assert "trainable params: 66 " in count_for_config(None, overrides)  # classifier: 32 x 2 + 2
    assert predict_memory(load_config(None, overrides)).to_dict()
