"""Speed levers of issue #9 that are settings: ``train.precision: auto`` and LoRA without dropout work at p=0."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
import peftkit.train.loop as loop
from peftkit.core.config import ConfigError
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.train.config import TrainConfig, load_config
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
    monkeypatch.setattr(loop, "native_bf16", lambda device: native)
    assert loop.resolve_precision("auto", cpu) == expected
    assert loop.resolve_precision("fp32", cpu) == "fp32" and loop.resolve_precision("bf16", cpu) == "bf16"
    with loop.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") is native


def test_this_cpu_is_detected_consistently() -> None:
    """oneDNN's check and /proc/cpuinfo agree (both say whether AVX512-BF16 or AMX is there)."""
    loop.native_bf16.cache_clear()
    flags = open("/proc/cpuinfo").read().split()
    assert loop.native_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_autocast_reaches_the_fp32_result(tiny_lm, tmp_path) -> None:
    """The quality check behind ``auto``: bf16 autocast (fp32 adapter weights) trains to about the fp32 loss."""
    model, tok = tiny_lm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = encode_all(Template.create(tok), ROWS, 64).examples
    losses = {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(state)
        torch.manual_seed(0)
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
        cfg = TrainConfig(max_steps=6, batch_size=4, lr=3e-2, warmup_steps=0, save_every=0, eval_every=0,
                          precision=precision)
        with pytest.warns(UserWarning, match="bf16") if precision == "bf16" else _nothing():
            loop.Trainer(model, data, [], cfg, tok.pad_token_id, tmp_path / precision, show_progress=False).fit()
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        losses[precision] = loop.evaluate_loss(model, data, 8, tok.pad_token_id)
        peftkit.unload(model)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05), losses


class _nothing:
    def __enter__(self) -> None: ...
    def __exit__(self, *a) -> None: ...


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
    """make_optimizer uses torch's fused AdamW where it can: the same update as the for-loop one."""
    results = []
    for fused in (True, False):
        model = build_llama()
        peftkit.inject(model, peftkit.FullConfig())
        opt = loop.make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
        assert opt.defaults["fused"] is True
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-2, fused=False, foreach=False)  # the same groups, the loop update
            assert opt.param_groups[0]["fused"] is False
        ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_blocks_compiles_the_layer_stack_with_the_same_loss() -> None:
    from peftkit.data.collate import pad_batch
    from peftkit.train.compile import compile_blocks, repeated_blocks

    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    assert repeated_blocks(model) == list(model.model.layers)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0)).tolist()
    batch = pad_batch([{"input_ids": ids[0], "labels": ids[0]}, {"input_ids": ids[1][:5], "labels": ids[1][:5]}], 0)
    plain, n = loop.lm_loss_sum(model, batch)
    assert compile_blocks(model, backend="eager") == 2  # the test backend: traced by dynamo, run eagerly
    compiled, m = loop.lm_loss_sum(model, batch)
    assert n == m and float(compiled.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    compiled.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert TrainConfig().compile is False and load_config(None, ["train.compile=true"]).train.compile is True
