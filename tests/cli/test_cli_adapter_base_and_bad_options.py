"""Issue #23: --model defaults to the adapter's recorded base; bad options, model folders and adapter files end
with one error line and exit 2; merge never replaces its own input; --version, --help defaults."""

import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import peftkit
from peftkit.cli.main import build_parser, main
from peftkit.models import load_model

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 3


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


@pytest.fixture
def base_dir(tiny_lm_dir, tmp_path):
    """A private copy of the tiny model folder (tests delete it or break its files)."""
    return shutil.copytree(tiny_lm_dir, tmp_path / "base")


def make_adapter(base, out, **lora):
    """A LoRA adapter saved from ``base`` loaded as peftkit loads it (it records the folder as its base)."""
    model, _ = load_model(base)
    peftkit.inject(model, peftkit.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init": "random", **lora}))
    return peftkit.save_adapter(model, out)


def run_err(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def assert_one_line_error(capsys, argv, pattern):
    code, err, _ = run_err(capsys, argv)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("peftkit: error: "), err
    assert re.search(pattern, err[0]), err[0]
    return err[0]


# -- 1. the adapter's recorded base is the default --model --------------------------------------------------


def test_generate_eval_merge_default_to_the_adapters_base(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Say the color of grass",
                 "--max-new-tokens", "3"]) == 0
    default_out = capsys.readouterr().out
    assert main(["generate", "--model", str(base_dir), "--adapter", str(adapter), "--prompt",
                 "Say the color of grass", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == default_out  # the same model as naming the base

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--limit", "2", "--max-new-tokens", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert AutoConfig.from_pretrained(merged).hidden_size == 32  # the tiny base, not smollm2-135m

    # --model still overrides the recorded base
    assert_one_line_error(capsys, ["generate", "--model", str(tmp_path / "elsewhere"), "--adapter", str(adapter),
                                   "--prompt", "x"], "unknown model .*elsewhere")


def test_recorded_base_folder_gone_is_one_line(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    shutil.rmtree(base_dir)
    for argv in (["generate", "--adapter", str(adapter), "--prompt", "x"],
                 ["eval", "--adapter", str(adapter)],
                 ["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]):
        line = assert_one_line_error(capsys, argv, "recorded base model .* no longer exists; pass --model")
        assert str(base_dir) in line
    assert not (tmp_path / "m").exists()


# -- 4. one line instead of a traceback -----------------------------------------------------------------------


@pytest.mark.parametrize("options, pattern", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    (["--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--sample", "--temperature", "-1"], "--temperature must be > 0"),
    (["--sample", "--top-p", "2"], r"--top-p must be in \(0, 1\], got 2.0"),
    (["--sample", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
])
def test_generate_bad_options(options, pattern, tiny_lm_dir, capsys):
    assert_one_line_error(capsys, ["generate", "--model", str(tiny_lm_dir), "--prompt", "x", *options], pattern)


@pytest.mark.parametrize("options, pattern", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-3"], "--limit must be >= 1 .*, got -3"),
    (["--shots", "-1"], "--shots must be >= 0, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_eval_bad_options(options, pattern, tiny_lm_dir, capsys):
    assert_one_line_error(capsys, ["eval", "--model", str(tiny_lm_dir), *options], pattern)


def test_eval_on_text_format_file(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"some plain text number {i}"}) + "\n" for i in range(4)))
    assert_one_line_error(capsys, ["eval", "--model", str(tiny_lm_dir), "--data", str(data)],
                          r"text.jsonl: text-format rows .* no prompt and answer to score.*\.txt")


class NotATensor:  # a pickled object torch's weights_only loader refuses
    pass


@pytest.mark.parametrize("damage, pattern", [
    ("no_tokenizer", r"base has no tokenizer files \(tokenizer.json"),
    ("truncated", r"base: model.safetensors is damaged or truncated"),
    ("unsafe_pickle", r"pytorch_model.bin is a pickle .* peftkit loads safetensors .*save_file"),
])
def test_broken_model_folder(damage, pattern, base_dir, capsys):
    weights = base_dir / "model.safetensors"
    if damage == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (base_dir / f).unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        torch.save({**load_file(weights), "extra": NotATensor()}, base_dir / "pytorch_model.bin")
        weights.unlink()
    for argv in (["generate", "--model", str(base_dir), "--prompt", "x"],
                 ["eval", "--model", str(base_dir)]):
        assert_one_line_error(capsys, argv, pattern)


def test_nan_alpha_in_adapter_config_and_in_run_config(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = float("nan")
    (adapter / "adapter_config.json").write_text(json.dumps(config))  # json writes NaN
    capsys.readouterr()  # what building the adapter printed (progress bars when this test runs alone)
    assert_one_line_error(capsys, ["generate", "--adapter", str(adapter), "--prompt", "x"],
                          r"adapter_config.json: method.alpha must be a finite number, got nan")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {base_dir}\nmethod: {{name: lora, alpha: .nan}}\n")
    assert_one_line_error(capsys, ["info", str(yaml_file)], "method.alpha must be a finite number, got nan")
    assert_one_line_error(capsys, ["info", f"model={base_dir}", "method.dropout=.inf"],
                          r"method.dropout must be in \[0, 1\), got inf")  # the method's own range check words it


# -- 5. adapter file shapes are checked against its config before anything is allocated ------------------------


def test_rank_in_config_not_matching_the_file_refused_before_allocating(base_dir, tmp_path, capsys, monkeypatch):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 1_000_000_000  # 256 GB of LoRA matrices on a 32-wide model, were they allocated
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = assert_one_line_error(capsys, ["generate", "--adapter", str(adapter), "--prompt", "x"],
                                 r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                                 r"has shape \(4, 32\) but the model expects \(1000000000, 32\) with the settings in "
                                 r"adapter_config.json")
    assert "adapter_model.safetensors" in line

    import peftkit.core.io as io

    real_inject, attached = io.inject, []

    def watching_inject(model, cfg, name="default"):
        attached.append(not any(p.is_meta for p in model.parameters()))
        return real_inject(model, cfg, name)

    monkeypatch.setattr(io, "inject", watching_inject)
    config["r"] = 100_000  # small enough to allocate if the check came after attaching
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model, _ = load_model(base_dir)
    with pytest.raises(peftkit.errors.AdapterFileError, match=r"has shape \(4, 32\) .* \(100000, 32\)"):
        peftkit.load_adapter(model, adapter)
    assert not any(attached), "the adapter was attached to the real model before its shapes were checked"
    assert not any("lora" in n for n, _ in model.named_parameters())


# -- 7. merge never writes over its input; the last line of a full fine-tune names its folder -----------------


def test_merge_refuses_out_that_is_or_holds_the_adapter(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for out, relation in [(adapter, "is"), (adapter / "merged", "is inside"), (tmp_path, "contains")]:
        assert_one_line_error(capsys, ["merge", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(out),
                                       "--overwrite"],
                              f"--out .* {relation} the --adapter folder .*: writing it would destroy the --adapter")
    assert_one_line_error(capsys, ["merge", "--model", str(base_dir), "--adapter", str(adapter), "--adapter",
                                   str(adapter), "--out", str(adapter), "--overwrite"], "is the --adapter folder")
    assert_one_line_error(capsys, ["merge", "--model", str(base_dir), "--adapter", str(adapter), "--out",
                                   str(base_dir), "--overwrite"], "is the --model folder")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_full_fine_tune_done_line_names_the_model_folder(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "full"
    assert main(["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", "method.name=full",
                 "train.max_steps=2", "train.batch_size=4", "train.eval_every=0", "train.save_every=0"]) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and f"model saved to {out / 'model'};" in done[0], done
    assert (out / "model" / "config.json").is_file()


# -- 9. --version, --help, a directory as config, bitsandbytes' notice ----------------------------------------


def test_version():
    r = subprocess.run([sys.executable, "-m", "peftkit", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and re.fullmatch(r"peftkit \S+\n", r.stdout), r.stdout


def test_help_gives_every_option_a_text_and_shows_defaults():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"peftkit {name}: {action.option_strings or action.dest} has no help text"
    for command, shown in [("generate", ["--max-new-tokens", "(default: 64)", "(default: 0.7)", "(default: 0.9)"]),
                           ("eval", ["(default: rotten-tomatoes)", "(default: 48)", "(default: test)"])]:
        text = " ".join(commands.choices[command].format_help().split())
        for piece in shown:
            assert piece in text, (command, piece)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_directory_as_config(tmp_path, capsys):
    assert_one_line_error(capsys, ["train", str(tmp_path)], f"config {tmp_path} is a directory, not a YAML file")


def test_bitsandbytes_kernel_hub_notice_is_silenced(caplog):
    import peftkit.methods.qlora  # noqa: F401  (registering the methods installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("something the user can act on")
    assert "kernels-community" not in caplog.text and "something the user can act on" in caplog.text


# -- 6. --resume refuses settings the checkpoint cannot continue under, and logs the ones it can ---------------


def test_resume_refuses_changed_method_data_or_lr_and_logs_allowed_changes(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    out = tmp_path / "run"
    args = ["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", "method.r=4",
            "train.max_steps=4", "train.batch_size=4", "train.eval_every=0", "train.save_every=2", "train.lr=1e-2"]
    assert main(args) == 0
    (out / "run_summary.json").unlink()  # as if it had been stopped after its last checkpoint
    shutil.rmtree(out / "adapter")
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()

    for change, named in [("method.r=8", "method.r: 4 -> 8"), (f"data.train={other}", "data.train: "),
                          ("train.lr=0.5", "train.lr: 0.01 -> 0.5"), ("method.name=dora", "method.name: 'lora' -> 'dora'"),
                          ("model=smollm2-135m", "model: ")]:
        line = assert_one_line_error(capsys, [*args, change, "--resume"], "--resume: the config differs")
        assert named in line, line
        assert (out / "config.yaml").read_text() == saved

    assert main([*args, "train.max_steps=6", "train.save_every=3", "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "resume: changed train.max_steps: 4 -> 6; train.save_every: 2 -> 3" in lines, lines
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 6
    assert "max_steps: 6" in (out / "config.yaml").read_text()
