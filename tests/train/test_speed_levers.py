"""Speed levers of issue #9 that are settings: ``train.precision: auto`` and LoRA without dropout work at p=0."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import peftkit
import peftkit.train.loop as loop
import peftkit.train.loss as loss_mod
import peftkit.train.optim as optim
import peftkit.train.precision as prec
from peftkit.core.config import ConfigError
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.runs.config import load_config
from peftkit.train.config import TrainConfig
from tests.tiny import build_llama

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 4


def test_precision_defaults_to_auto() -> None:
    assert TrainConfig().precision == "auto"
    assert load_config(None, ["train.precision=fp32"]).train.precision == "fp32"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_on_native_hardware(monkeypatch, native: bool, expected: str) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "native_bf16", lambda device: native)
    assert prec.resolve_precision("auto", cpu) == expected
    assert prec.resolve_precision("fp32", cpu) == "fp32" and prec.resolve_precision("bf16", cpu) == "bf16"
    with prec.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") is native


def test_this_cpu_is_detected_consistently() -> None:
    """oneDNN's check and /proc/cpuinfo agree (both say whether AVX512-BF16 or AMX is there)."""
    prec.native_bf16.cache_clear()
    flags = open("/proc/cpuinfo").read().split()
    assert prec.native_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)


NO_NATIVE_BF16 = "CPU without native bf16"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once_per_autocast(monkeypatch, native: bool) -> None:
    """Both branches on every machine: the warning depends on the feature check, not on this CPU."""
    monkeypatch.setattr(prec, "native_bf16", lambda device: native)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with prec.autocast(torch.device("cpu"), "bf16"):
            assert torch.is_autocast_enabled("cpu")
    assert [NO_NATIVE_BF16 in str(w.message) for w in seen] == ([] if native else [True])


def test_bf16_autocast_reaches_the_fp32_result(tiny_lm, tmp_path) -> None:
    """The quality check behind ``auto``: bf16 autocast (fp32 adapter weights) trains to about the fp32 loss."""
    model, tok = tiny_lm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = encode_all(Template.create(tok), ROWS, 64).examples
    native = prec.native_bf16(torch.device("cpu"))  # this CPU's own answer: AVX512-BF16/AMX or not
    losses = {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(state)
        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
        cfg = TrainConfig(max_steps=6, batch_size=4, lr=3e-2, warmup_steps=0, save_every=0, eval_every=0,
                          precision=precision)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loop.Trainer(model, data, [], cfg, loop.Batching(tok.pad_token_id),
                         loop.Wiring(tmp_path / precision, show_progress=False)).fit()
        slow = [w for w in seen if NO_NATIVE_BF16 in str(w.message)]
        # emulated bf16 is worth a warning; native bf16 (AVX512-BF16, AMX) is what ``auto`` picks, so none there
        assert bool(slow) == (precision == "bf16" and not native), [str(w.message) for w in slow]
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        losses[precision] = loss_mod.evaluate_loss(model, data, 8, tok.pad_token_id)
        peftkit.unload(model)
    # Not an equivalence (6 Adam steps at lr 3e-2 from bf16-rounded activations, 2^-8 relative each, follow
    # another path than fp32's): a quality bound. The loss falls from ~11 by several nats in these steps
    # (test_loop.py), so 5% of it is well above bf16's effect on where the run ends and below a run that
    # failed to train.
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05), losses


def test_lora_without_dropout_does_no_dropout_work() -> None:
    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4, dropout=0.0))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # train mode is deterministic: nothing random runs


def test_fused_adamw_matches_the_loop_update() -> None:
    """make_optimizer uses torch's fused AdamW where it can: the same update as the for-loop one.

    Both optimizers are given the same gradients at every step (computed once, copied), so what is compared is the
    update arithmetic alone. Recomputing each run's gradients from its own weights would let the first step's
    rounding change the later gradients, and Adam (about lr * sign(g) early on) turns a near-zero gradient
    element's rounding into an lr-sized step."""
    steps, lr = 3, 1e-2
    models, opts = [], []
    for fused in (True, False):
        model = build_llama()
        peftkit.inject(model, peftkit.FullConfig())
        opt = optim.make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.1))
        assert opt.defaults["fused"] is True
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=lr, fused=False, foreach=False)  # the same groups, the loop update
            assert opt.param_groups[0]["fused"] is False
        models.append(model)
        opts.append(opt)
    start = [p.detach().clone() for p in models[0].parameters()]
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        models[0](input_ids=ids, labels=ids).loss.backward()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    # Per step each weight goes through a few fp32 roundings (decay, update, add): <= ~4 ulp of |p| plus the
    # update's own rounding (~4 ulp of its size, <= ~lr): rtol = steps * 4 * eps = 1.4e-6, and
    # atol = steps * 4 * eps * lr = 1.4e-8 for weights near 0. A missing or wrong term (weight decay: lr * 0.1 * p
    # = 1e-3 of p; bias correction or eps: a share of lr) is orders of magnitude above.
    eps = torch.finfo(torch.float32).eps
    moved = False
    for a, b, p0 in zip(models[0].parameters(), models[1].parameters(), start):
        torch.testing.assert_close(a, b, rtol=steps * 4 * eps, atol=steps * 4 * eps * lr)
        moved |= not torch.equal(a, p0)
    assert moved


def test_compile_blocks_compiles_the_layer_stack_with_the_same_loss() -> None:
    from peftkit.data.collate import pad_batch
    from peftkit.train.compile import compile_blocks, repeated_blocks

    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    assert repeated_blocks(model) == list(model.model.layers)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0)).tolist()
    batch = pad_batch([{"input_ids": ids[0], "labels": ids[0]}, {"input_ids": ids[1][:5], "labels": ids[1][:5]}], 0)
    plain, n = loss_mod.lm_loss_sum(model, batch)
    assert compile_blocks(model, backend="eager") == 2  # the test backend: traced by dynamo, run eagerly
    compiled, m = loss_mod.lm_loss_sum(model, batch)
    assert n == m and float(compiled.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    compiled.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert TrainConfig().compile is False and load_config(None, ["train.compile=true"]).train.compile is True
