"""End-to-end CLI runs on a tiny model, and every bad input: one error line, exit 2, nothing lost."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli.main import main

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 6


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def train_args(model_dir, data, out, *extra):
    return ["train", f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "train.max_steps=12",
            "train.lr=3e-2", "train.batch_size=4", "train.eval_every=6", "train.save_every=6", *extra]


def run_err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_train_generate_merge_and_load_merged_with_transformers(tiny_lm_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_lm_dir, data_file, out, "method.target_modules=all-linear")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 12 and summary["status"] == "finished"
    assert (out / "loss.png").stat().st_size > 1000
    capsys.readouterr()

    assert main(["generate", "--model", str(tiny_lm_dir), "--adapter", str(out / "adapter"),
                 "--prompt", "Say the color of grass", "--max-new-tokens", "4"]) == 0
    generated = capsys.readouterr().out.strip()
    assert generated  # the exact text is checked below against a direct greedy decode

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_lm_dir), "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)  # no peftkit involved
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with_adapter = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peftkit.load_adapter(with_adapter, out / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)

    from transformers import AutoTokenizer

    from peftkit.data.template import Template, user_example
    from peftkit.eval.generate import generate

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    direct = generate(plain, Template.create(tok), [user_example("Say the color of grass")], max_new_tokens=4)
    assert direct == [generated]

    # refusing to clobber: the finished run and the merged folder stay as they were
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err = run_err(capsys, train_args(tiny_lm_dir, data_file, out))
    assert code == 2 and len(err) == 1 and "already holds a finished run" in err[0]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    code, err = run_err(capsys, ["merge", "--model", str(tiny_lm_dir), "--adapter", str(out / "adapter"), "--out", str(merged)])
    assert code == 2 and "not empty" in err[0]


def test_info_lists_methods_and_counts(tiny_lm_dir, capsys):
    assert main(["info", f"model={tiny_lm_dir}", "method.r=4", "method.target_modules=[q_proj, v_proj]"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "smollm2-135m" in out and "rotten-tomatoes" in out
    # 2 layers x (q: 32*4 + 4*32, v: 32*4 + 4*16)
    expected = 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))
    assert f"trainable params: {expected:,}" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_config", "config file not found"),
        ("missing_data", "data file not found"),
        ("malformed_line", r"data.jsonl:3: malformed JSON"),
        ("missing_field", r"data.jsonl:2: missing field 'output'"),
        ("wrong_type", r"data.jsonl:1: field 'output' must be a string, got int"),
        ("empty_data", "no examples in the file"),
        ("unknown_model", "unknown model 'no-such-model'"),
        ("unknown_method", "unknown method 'lorax'"),
        ("unknown_key", "unknown config key 'train.batchsize'; did you mean 'train.batch_size'"),
        ("bad_target", "target_modules=\\['qq_proj'\\] matched no module; available module names: .*q_proj"),
    ],
)
def test_bad_input_one_line_exit_2(case, message, tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = json.dumps(ROWS[0])
    lines = {
        "malformed_line": [good, good, '{"instruction": "x", '],
        "missing_field": [good, json.dumps({"instruction": "x"})],
        "wrong_type": [json.dumps({"instruction": "x", "output": 3})],
        "empty_data": [],
    }.get(case, [good] * 4)
    data.write_text("".join(line + "\n" for line in lines))
    args = train_args(tiny_lm_dir, data, tmp_path / "out")
    if case == "missing_config":
        args = ["train", str(tmp_path / "nope.yaml")]
    elif case == "missing_data":
        args = train_args(tiny_lm_dir, tmp_path / "nope.jsonl", tmp_path / "out")
    elif case == "unknown_model":
        args[1] = "model=no-such-model"
    elif case == "unknown_method":
        args.append("method.name=lorax")
    elif case == "unknown_key":
        args.append("train.batchsize=3")
    elif case == "bad_target":
        args.append("method.target_modules=[qq_proj]")
    code, err = run_err(capsys, args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("peftkit: error: "), err
    import re

    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out" / "adapter").exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "peftkit", "train", "train.max_steps=-1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "peftkit: error: train.max_steps must be > 0, got -1"


def test_help_is_the_manual():
    r = subprocess.run([sys.executable, "-m", "peftkit", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "key=value" in r.stdout and "--resume" in r.stdout


def test_full_fine_tuning_writes_a_model_folder(tiny_lm_dir, data_file, tmp_path):
    out = tmp_path / "full"
    assert main(train_args(tiny_lm_dir, data_file, out, "method.name=full", "train.lr=1e-3",
                           "train.save_every=0")) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["output_kind"] == "model" and not (out / "adapter").exists()
    assert summary["trainable_percent"] == 100.0
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers, no peftkit
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (tuned(ids).logits - base(ids).logits).abs().max() > 1e-3
    assert (out / "best" / "config.json").is_file()  # the best-so-far copy is a model folder too
