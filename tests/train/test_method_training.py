"""Each module-wrapper method trains with the method-agnostic loop: the tiny LM's loss goes down, only adapter
tensors change, the trained adapter survives save -> load; gradient checkpointing and a bf16 base work too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.config import MethodConfig
from peftkit.data.collate import pad_batch
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dora import DoraConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, Wiring, enable_gradient_checkpointing
from peftkit.train.loss import evaluate_loss, lm_loss_sum
from tests.tiny import make_tiny, perturb_adapters
from tests.train.test_loop import encoded

# (config, learning rate): rates these methods take on the tiny LM in 10 steps
METHODS: dict[str, tuple[MethodConfig, float]] = {
    "ia3": (IA3Config(), 1e-1),
    "dora": (DoraConfig(r=4, alpha=8, target_modules="all-linear"), 3e-2),
    "bottleneck_adapter": (BottleneckConfig(size=8), 1e-2),
    "llama_adapter": (LlamaAdapterConfig(adapter_len=4), 5e-2),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_reduces_loss(method: str, tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    config, lr = METHODS[method]
    torch.manual_seed(0)
    peftkit.inject(model, config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = encoded(tok)
    before = evaluate_loss(model, data[:16], 8, tok.pad_token_id)
    cfg = TrainConfig(max_steps=10, batch_size=8, lr=lr, warmup_steps=0, eval_every=0, save_every=0)
    Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    after = evaluate_loss(model, data[:16], 8, tok.pad_token_id)
    assert after < before - 1.0, (method, before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    peftkit.save_adapter(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(model.config._name_or_path)
    peftkit.load_adapter(fresh, tmp_path / "adapter")
    assert evaluate_loss(fresh, data[:16], 8, tok.pad_token_id) == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_gradients(method: str, tiny_lm) -> None:
    model, tok = tiny_lm
    peftkit.inject(model, METHODS[method][0])
    perturb_adapters(model, std=0.5)
    batch = pad_batch(encoded(tok)[:4], tok.pad_token_id)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss, _ = lm_loss_sum(model, batch)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    model.train()
    plain = grads()
    enable_gradient_checkpointing(model)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_base_keeps_fp32_adapter_weights(method: str) -> None:
    tiny = make_tiny("llama")
    reference = peftkit.inject(tiny.build(), METHODS[method][0])
    perturb_adapters(reference, std=0.5)
    model = peftkit.inject(tiny.build().to(torch.bfloat16), METHODS[method][0])
    perturb_adapters(model, std=0.5)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    out = tiny.run(model)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), tiny.run(reference), atol=0.1, rtol=0.05)
