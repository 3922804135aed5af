"""Faults a run must survive: SIGINT/SIGTERM (stop after the step, checkpoint, clean exit), NaN/inf loss
(stop naming the step and last good checkpoint, or skip the batch), a full disk or unwritable output_dir
(clear error, nothing earlier lost), and files that try to run code (never executed)."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.cli.main import main
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.errors import TrainingError
from peftkit.train import loss as loss_mod
from peftkit.train.checkpoint import CheckpointError, list_checkpoints
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, TrainingInterrupted, Wiring

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 8


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def make_trainer(tiny_lm_dir, out, **cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    data = encode_all(Template.create(tok), ROWS, 64).examples
    settings = dict(max_steps=8, batch_size=4, lr=3e-2, warmup_steps=0, save_every=0, eval_every=0, log_every=1)
    settings.update(cfg)
    return Trainer(model, data, data[:8], TrainConfig(**settings), Batching(tok.pad_token_id),
                   Wiring(out, export=lambda p: peftkit.save_adapter(model, p), show_progress=False))


def adapter(trainer):
    return peftkit.adapter_state_dict(trainer.model)


def poison(monkeypatch, calls_to_poison, value=float("nan")):
    """Make the loss of the given forward calls (1-based) NaN/inf."""
    real, calls = loss_mod.lm_loss_sum, {"n": 0}

    def poisoned(m, batch):
        loss, n = real(m, batch)
        calls["n"] += 1
        return (loss * value if calls["n"] in calls_to_poison else loss), n

    monkeypatch.setattr(loss_mod, "lm_loss_sum", poisoned)


# -- signals ------------------------------------------------------------------------------------
def test_sigint_finishes_step_checkpoints_and_resumes_exactly(tiny_lm_dir, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under nohup / `&`
    ref = make_trainer(tiny_lm_dir, tmp_path / "ref")
    ref.fit()

    real, calls = loss_mod.lm_loss_sum, {"n": 0}

    def interrupting(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of step 3's forward
            os.kill(os.getpid(), signal.SIGINT)
        return real(m, batch)

    monkeypatch.setattr(loss_mod, "lm_loss_sum", interrupting)
    out = tmp_path / "run"
    first = make_trainer(tiny_lm_dir, out)
    with pytest.raises(TrainingInterrupted) as info:
        first.fit()
    assert info.value.exit_code == 130
    assert str(info.value) == (f"SIGINT: stopped after step 3/8; checkpoint saved to {out / 'checkpoints' / 'step-000003'}; "
                               "continue with --resume")
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    monkeypatch.setattr(loss_mod, "lm_loss_sum", real)
    second = make_trainer(tiny_lm_dir, out)
    assert second.fit(list_checkpoints(out)[-1]).step == 8
    a, b = adapter(ref), adapter(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_subprocess_exits_cleanly_with_message(tiny_lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "peftkit", "train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}",
            "train.max_steps=100000", "train.save_every=0", "train.log_every=1", "train.eval_every=0",
            "train.batch_size=4", "train.threads=1", "train.schedule=constant"]
    env = {**os.environ, "PEFTKIT_TENSORBOARD": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("peftkit: SIGTERM: stopped after step ") and last.endswith("continue with --resume"), last
    step = int(last.split("after step ")[1].split("/")[0])
    assert [p.name for p in list_checkpoints(out)] == [f"step-{step:06d}"]
    assert not (out / "run_summary.json").exists()
    # --resume continues from there (to a nearer end)
    r = subprocess.run(args[:7] + [f"train.max_steps={step + 2}"] + args[8:] + ["--resume"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run_summary.json").read_text())["steps"] == step + 2


# -- NaN / inf ------------------------------------------------------------------------------------
def test_nan_stops_naming_step_and_last_good_checkpoint(tiny_lm_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm_dir, tmp_path, save_every=2)
    poison(monkeypatch, {5})
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    last = tmp_path / "checkpoints" / "step-000004"
    assert str(info.value) == f"loss became nan at step 5; last good checkpoint: {last} (train.on_nan=skip skips such batches instead)"
    assert load_file(str(last / "trainable.safetensors"))


def test_inf_gradient_is_caught_too(tiny_lm_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm_dir, tmp_path)
    real = loss_mod.lm_loss_sum

    def huge_grad(m, batch):  # finite loss, infinite gradient
        loss, n = real(m, batch)
        return loss + 0.0 * torch.exp(torch.stack([p.sum() for p in m.parameters() if p.requires_grad]).sum() * 1e6), n

    monkeypatch.setattr(loss_mod, "lm_loss_sum", huge_grad)
    with pytest.raises(TrainingError, match=r"at step 1; no checkpoint written yet"):
        trainer.fit()


def test_skip_bad_batch_option(tiny_lm_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm_dir, tmp_path, on_nan="skip")
    poison(monkeypatch, {3, 6}, float("inf"))
    state = trainer.fit()
    assert state.step == 8 and state.skipped_batches == 2
    assert all(torch.isfinite(v).all() for v in adapter(trainer).values())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batch"] for r in records if "skipped_batch" in r] == [1, 2]


def test_skip_gives_up_after_many_bad_batches_in_a_row(tiny_lm_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm_dir, tmp_path, on_nan="skip", max_steps=30)
    poison(monkeypatch, set(range(2, 100)))
    with pytest.raises(TrainingError, match=r"loss became nan at step 2, 10 bad batches in a row; giving up"):
        trainer.fit()


def test_nan_via_cli_is_one_line_exit_2(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    poison(monkeypatch, {3})
    code = main(["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={tmp_path / 'o'}",
                 "train.max_steps=5", "train.save_every=2", "train.batch_size=4", "train.eval_every=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("peftkit: error: loss became nan at step 3; last good checkpoint: ") and "step-000002" in err[0]


# -- disk full / unwritable ---------------------------------------------------------------------------
def test_disk_full_during_checkpoint_keeps_previous(tiny_lm_dir, tmp_path, monkeypatch):
    import peftkit.train.checkpoint as ck

    trainer = make_trainer(tiny_lm_dir, tmp_path, save_every=2)
    real, calls = ck.save_file, {"n": 0}

    def full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    first = tmp_path / "checkpoints" / "step-000002"
    assert str(info.value) == (f"cannot write checkpoint {tmp_path / 'checkpoints' / 'step-000004'}: No space left on device; "
                               f"the last complete checkpoint {first} is intact")
    assert os.listdir(tmp_path / "checkpoints") == ["step-000002"]  # no half-written leftovers
    assert json.loads((first / "trainer_state.json").read_text())["step"] == 2
    assert load_file(str(first / "adapter" / "adapter_model.safetensors"))


def test_disk_full_writing_final_adapter_keeps_the_old_one(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    import peftkit.core.io as io

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "o"
    args = ["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", "train.max_steps=3",
            "train.save_every=0", "train.eval_every=0", "train.batch_size=4"]
    assert main(args) == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    real = io.save_file

    def full(tensors, path, *a, **k):
        if "/.adapter.tmp-" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(io, "save_file", full)
    capsys.readouterr()
    assert main(args + ["overwrite=true", "train.lr=1e-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peftkit: error: cannot write the adapter to {out / 'adapter'}: No space left on device"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unwritable_output_dir_fails_before_anything_slow(tiny_lm_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["train", f"model={tiny_lm_dir}", "data.train=/nonexistent.jsonl", f"output_dir={blocker / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"peftkit: error: output_dir {blocker / 'out'} cannot be created: {blocker} is not a folder"]
    if os.geteuid() != 0:  # root writes through permissions: only the path-under-a-file case applies there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code = main(["train", f"model={tiny_lm_dir}", f"output_dir={locked / 'out'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "is not writable" in err[0]


# -- files that carry code -------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PEFTKIT_EVIL_MARKER', '/tmp/peftkit-evil')}",))


def test_pickled_code_in_checkpoint_is_not_run(tiny_lm_dir, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PEFTKIT_EVIL_MARKER", str(marker))
    trainer = make_trainer(tiny_lm_dir, tmp_path / "o", save_every=2, max_steps=3)
    trainer.fit()
    ckpt = list_checkpoints(tmp_path / "o")[-1]
    (ckpt / "optim.pt").write_bytes(pickle.dumps({"optimizer": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"unreadable checkpoint \(UnpicklingError"):
        make_trainer(tiny_lm_dir, tmp_path / "o").fit(ckpt)
    assert not marker.exists()


def test_pickle_only_adapter_is_refused(tiny_lm_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PEFTKIT_EVIL_MARKER", str(marker))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(peftkit.AdapterFileError if hasattr(peftkit, "AdapterFileError") else Exception,
                       match="only safetensors adapters are loaded"):
        peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "ad")
    assert not marker.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil-net"])
def test_model_folder_code_is_not_run(tiny_lm_dir, tmp_path, capsys, model_type):
    """A model folder that ships Python (auto_map) never has it run with trust_remote_code off:
    a known architecture loads with the library's code; an unknown one is a one-line error."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, folder)
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil-net'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(["train", f"model={folder}", f"data.train={data}", f"output_dir={tmp_path / 'o'}", "train.max_steps=1",
                 "train.eval_every=0", "train.save_every=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    if model_type == "llama":
        assert code == 0
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith(f"peftkit: error: model {folder}: cannot load"), err


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", ".", ""])
def test_adapter_names_cannot_be_paths(tiny_lm_dir, name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="invalid adapter name"):
        peftkit.inject(model, peftkit.LoraConfig(r=2), adapter_name=name)
