"""Data-parallel training on 2 CPU processes (gloo), started the documented way: ``torchrun -m peftkit train``.

The claim tested: 2 ranks x batch b train the same adapter as 1 rank x batch 2b over the same data order
(within fp32 tolerance), with DDP and with FSDP (whose adapter must be saved whole, not one rank's shard).

Both sides train with SGD + momentum (tests/train/smooth_optim.py), not AdamW: the runs' gradients differ by
summation order only, and Adam's early updates (about lr * sign(g)) turn a sign flip of a rounding-level
gradient into a move of up to 2 * lr (issue #23, an AVX512 CPU); SGD's update is linear in the gradients, so
the adapters can be compared within a bound derived from fp32 rounding (:func:`assert_same_adapter`).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import ConfigError
from peftkit.runs.config import load_config
from peftkit.runs.run import train_run
from peftkit.train.distributed import Dist, local_slice, setup, shard
from tests.train import smooth_optim

WORDS = "grass sky snow coal blood sun night milk leaf rose sea ash gold cloud fire ink lime plum rust sand".split()
# Lengths vary (so length grouping matters); 25 rows: the last global batch of 8 holds 1 example, so rank 1's
# slice is empty and it must still take part in the step.
ROWS = ([{"instruction": f"Say the color of {w}" + " please" * (i % 4), "input": "", "output": w[::-1]} for i, w in enumerate(WORDS)]
        + [{"instruction": f"Name {i}", "input": "", "output": "x" * (i + 1)} for i in range(5)])


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REPO = Path(__file__).resolve().parents[2]
FP32_U = 2.0 ** -24  # fp32 unit roundoff
# How far a gradient the optimizer gets can differ between the runs, relative to the tensor's largest gradient:
# n * u (Higham) for the longest fp32 sum behind it, n = 49152: the tied head's backward sums over the vocabulary
# (longer than the step's tokens, ~300, or the 32/64-wide layers). Reordered and re-blocked sums (2 ranks of 4
# rows vs 8 rows padded otherwise) each stay within that of the exact one, hence the 2 in the bound below.
GRAD_REL = 49152 * FP32_U


def overrides(model_dir, train, val, out, *extra):
    # SGD (below): lr 0.1 moves the adapter about as far as AdamW's 3e-2 did (losses 14.4 -> ~12). No gradient
    # clipping: these runs' global norms are ~7-14, and clipping them would normalize away a gradient off by a
    # constant factor (summed instead of averaged over ranks, say); Adam hid such a factor too.
    return [f"model={model_dir}", f"data.train={train}", f"data.validation={val}", f"output_dir={out}",
            "train.max_steps=6", "train.save_every=3", "train.eval_every=3", "train.lr=0.1", "train.warmup_steps=0",
            "train.max_grad_norm=0", "train.threads=1", "train.log_every=1", "method.r=4",
            "method.target_modules=all-linear", *extra]


def torchrun(args, tmp_path, timeout=240, module="tests.train.smooth_optim") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m MODULE train ARGS`` (a free local port; its own
    process group, so a hang is killed whole, workers included). MODULE: ``peftkit``'s CLI with SGD
    (tests/train/smooth_optim.py) by default."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PEFTKIT_TENSORBOARD": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", module, "train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def reference(args, monkeypatch) -> list[tuple[float, dict[str, float]]]:
    """The one-rank run, in this process, with the same SGD; returns each step's (lr, {file key: max |grad|})."""
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    steps: list = []
    smooth_optim.install(monkeypatch, record=steps)
    train_run(load_config(None, args), show_progress=False, log=lambda *a: None)
    # parameter names (model.layers.0...lora_A.default.weight) as the adapter file keys them
    return [(lr, {"base_model.model." + n.replace(".default.", "."): g for n, g in grads.items()}) for lr, grads in steps]


def assert_same_adapter(a_dir: Path, b_dir: Path, steps: list[tuple[float, dict[str, float]]]) -> None:
    """``b`` (2 ranks) equals ``a`` (the reference, trained by ``steps``) tensor by tensor within twice the SGD
    rounding bound (smooth_optim.sgd_tolerance at GRAD_REL): 2 for the two runs' roundings, and margin for the
    later gradients' response to the rounding-sized weight difference. It is ~1e-3 of how far the tensor moved:
    a wrong average across ranks or a rank's missing data moves the adapter off by far more."""
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28  # 2 layers x 7 linears x (A, B): every tensor, whole
    assert a.keys() <= set().union(*(g for _, g in steps))  # every tensor got gradients
    assert max(float(v.abs().max()) for v in a.values()) > 0.05  # the adapter did move
    for k in a:
        assert a[k].shape == b[k].shape, k
        atol = 2 * 2 * smooth_optim.sgd_tolerance(steps, k, GRAD_REL)
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# A logged loss is a mean of token losses logsumexp(logits) - logit[target]; the logsumexp sums 49152 positive
# terms, within GRAD_REL of the sum relatively, so within GRAD_REL absolutely after the log (2: the two runs).
# The other sums are 32-64 long; the runs' weights differ by rounding (measured <= 3e-5), moving the loss by ~1e-4.
# Rank 0's own half of a batch instead of the whole would be off by tenths.
LOSS_ATOL = 2 * GRAD_REL


def assert_same_metrics(ref: Path, out: Path) -> None:
    a, b = metrics(ref), metrics(out)
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]  # rank 0 alone logged
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= LOSS_ATOL, (x, y)


def test_ddp_two_ranks_equal_one_rank_double_batch(tiny_lm_dir, tmp_path, monkeypatch):
    train, val = write(tmp_path / "train.jsonl", ROWS), write(tmp_path / "val.jsonl", ROWS[:7])
    steps = reference(overrides(tiny_lm_dir, train, val, tmp_path / "one", "train.batch_size=8"), monkeypatch)
    r = torchrun(overrides(tiny_lm_dir, train, val, tmp_path / "two", "train.batch_size=4"), tmp_path)
    assert "effective batch 8 = 4 per rank x 2 ranks x 1 accumulation" in r.stdout
    assert r.stdout.count("done: 6 steps") == 1  # only rank 0 logs
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_adapter(one / "adapter", two / "adapter", steps)
    assert_same_metrics(one, two)
    summary = json.loads((two / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == "ddp" and summary["effective_batch_size"] == 8
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-000003"]


def test_fsdp_saves_full_adapter_equal_to_one_rank(tiny_lm_dir, tmp_path, monkeypatch):
    """FSDP (fully_shard on CPU/gloo) with gradient accumulation: 2 ranks x 2 x 2 micro-batches == 1 x 8."""
    rows = ROWS[:24]  # accumulation equals a bigger batch when epochs split evenly (as on one rank)
    train, val = write(tmp_path / "train.jsonl", rows), write(tmp_path / "val.jsonl", ROWS[:7])
    common = ("data.group_by_length=false",)
    steps = reference(overrides(tiny_lm_dir, train, val, tmp_path / "one", "train.batch_size=8", *common), monkeypatch)
    r = torchrun(overrides(tiny_lm_dir, train, val, tmp_path / "two", "train.batch_size=2", "train.grad_accum=2",
                           "train.distributed=fsdp", *common), tmp_path)
    assert "fsdp on 2 rank(s)" in r.stdout and "2 per rank x 2 ranks x 2 accumulation" in r.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_adapter(one / "adapter", two / "adapter", steps)
    assert_same_adapter(one / "checkpoints" / "step-000003" / "adapter", two / "checkpoints" / "step-000003" / "adapter",
                        steps[:3])
    assert_same_adapter(one / "best", two / "best", steps)  # step 3 or 6: the bound of 6 steps holds for both
    assert_same_metrics(one, two)
    # the checkpoint holds the full trainable tensors and a full (name-keyed) optimizer state
    ckpt = two / "checkpoints" / "step-000003"
    assert len(load_file(str(ckpt / "trainable.safetensors"))) == 28
    optim = torch.load(ckpt / "optim.pt", weights_only=True)
    assert optim["optimizer"]["format"] == "fqn" and len(optim["optimizer"]["state"]["state"]) == 28
    assert len(optim["rank_rng"]) == 2


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (1, 2), (10, 3), (0, 2)])
def test_shard_splits_evenly_and_covers_all(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_empty_slice_becomes_zero_weight_stand_in():
    assert local_slice([5], Dist("ddp", 1, 2)) == ([5], 0.0)
    assert local_slice([5], Dist("ddp", 0, 2)) == ([5], 1.0)
    assert local_slice([1, 2, 3, 4], Dist("ddp", 1, 2)) == ([3, 4], 1.0)


def test_setup_modes(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert setup("auto") == Dist() and setup("none") == Dist()
    with pytest.raises(ConfigError, match="train.distributed=ddp needs a launcher: torchrun"):
        setup("ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="train.distributed=none but torchrun started 2 processes"):
        setup("none")
    with pytest.raises(ConfigError, match="train.distributed must be one of"):
        load_config(None, ["train.distributed=deepspeed"])


@pytest.fixture
def fsdp_one_rank(tmp_path):
    """An in-process gloo group of one rank: FSDP's save/load paths without starting processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Dist("fsdp", 0, 1)
    dist.destroy_process_group()


def test_fsdp_checkpoint_resume(tiny_lm_dir, tmp_path, fsdp_one_rank, monkeypatch):
    """Resume from an FSDP checkpoint (sharded params and name-keyed optimizer state loaded back) ==
    a run never stopped; both equal a plain run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit
    from peftkit.data.template import Template
    from peftkit.data.tokenize import encode_all
    from peftkit.train.config import TrainConfig
    from peftkit.train.distributed import full_trainable_params
    from peftkit.train.loop import Batching, Trainer, Wiring

    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    data = encode_all(Template.create(tok), ROWS, 64).examples

    def run(out, dist, resume=None):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
        cfg = TrainConfig(max_steps=6, batch_size=4, lr=3e-2, warmup_steps=0, save_every=3, eval_every=0)
        trainer = Trainer(model, data, [], cfg, Batching(tok.pad_token_id),
                          Wiring(out, lambda p: peftkit.save_adapter(model, p), show_progress=False, dist=dist))
        trainer.fit(resume)
        with full_trainable_params(model):
            return peftkit.adapter_state_dict(model)

    plain = run(tmp_path / "plain", Dist())
    whole = run(tmp_path / "fsdp", fsdp_one_rank)
    resumed = run(tmp_path / "fsdp", fsdp_one_rank, tmp_path / "fsdp" / "checkpoints" / "step-000003")
    assert plain.keys() == whole.keys() == resumed.keys() and len(plain) == 28
    for k in plain:
        torch.testing.assert_close(whole[k], plain[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="written by an FSDP run"):
        run(tmp_path / "fsdp", Dist(), tmp_path / "fsdp" / "checkpoints" / "step-000003")
