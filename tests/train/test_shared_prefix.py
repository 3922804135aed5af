"""The shared prompt prefix runs once per batch (train/shared_prefix.py): same loss and gradients as the plain forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import peftkit
import peftkit.train.shared_prefix as sp
from peftkit.data.collate import pad_batch
from peftkit.data.tokenize import IGNORE
from peftkit.train.loss import lm_loss_sum
from tests.tiny import VOCAB, build_gpt2, build_llama, perturb_adapters

PREFIX = 12


def _batch(prefix: int = PREFIX, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows that share their first ``prefix`` tokens (a template) and have labels only on a tail (a response)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, VOCAB, (prefix,), generator=g).tolist()
    examples = []
    for n, k in ((9, 3), (14, 2), (6, 4), (11, 1)):
        ids = head + torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * (len(ids) - k) + ids[len(ids) - k:]})
    return pad_batch(examples, pad_id=0)


def _loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor], share: bool) -> tuple[float, int, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, n = lm_loss_sum(model, batch, share_prefix=share)
    loss.backward()
    return float(loss.detach()), n, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _assert_same(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    plain, n0, g0 = _loss_and_grads(model, batch, share=False)
    shared, n1, g1 = _loss_and_grads(model, batch, share=True)
    assert n0 == n1 > 0
    assert shared == pytest.approx(plain, rel=1e-5)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "full", "prompt_tuning", "prefix_tuning", "llama_adapter"])
def test_same_loss_and_grads_as_plain_forward(build, method: str) -> None:
    model = build()
    config = {"lora": peftkit.LoraConfig(r=4, target_modules="all-linear"), "full": peftkit.FullConfig(),
              "prompt_tuning": peftkit.PromptTuningConfig(num_virtual_tokens=3),
              "prefix_tuning": peftkit.PrefixTuningConfig(num_virtual_tokens=3),
              "llama_adapter": peftkit.LlamaAdapterConfig(adapter_len=3)}[method]  # perturbed: gates open
    peftkit.inject(model, config)
    if method != "full":
        perturb_adapters(model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first-use check must pass, not fall back with a warning
        _assert_same(model, _batch())
    assert sp._CHECKED.get(model) is True


def test_prefix_runs_once_for_the_batch() -> None:
    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    model.train()
    batch = _batch()
    lm_loss_sum(model, batch)  # first use: the check (two no-grad forwards) happens here
    shapes = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape[:2])))
    lm_loss_sum(model, batch)
    handle.remove()
    width = batch["input_ids"].shape[1]
    assert shapes == [(1, PREFIX), (4, width - PREFIX)]


def test_prefix_length_rules() -> None:
    batch = _batch()
    assert sp.shared_prefix_len(batch) == PREFIX
    ids = batch["input_ids"].clone()
    ids[2, 10] = (ids[2, 10] + 1) % VOCAB  # rows differ from position 10 on
    assert sp.shared_prefix_len({**batch, "input_ids": ids}) == 10
    labels = batch["labels"].clone()
    labels[1, 9] = 5  # a label at 9 is predicted from 8: the prefix stops before 8
    assert sp.shared_prefix_len({**batch, "labels": labels}) == 8
    assert sp.shared_prefix_len(_batch(prefix=sp.MIN_PREFIX - 1)) == 0  # too short to pay for a second call
    assert sp.shared_prefix_len({k: v[:1] for k, v in batch.items()}) == 0  # one row: nothing to share
    assert sp.shared_prefix_len({**batch, "position_ids": torch.zeros_like(ids)}) == 0  # packed: not handled


def test_not_used_where_it_would_differ() -> None:
    model = build_gpt2(resid_pdrop=0.1)  # active dropout: rows would share one mask on the prefix
    model.train()
    assert not sp.can_share(model)
    model.eval()
    assert sp.can_share(model)
    llama = build_llama()
    llama.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert not sp.can_share(llama)
    wrapper = nn.Module()
    wrapper.module = build_llama()  # DDP/FSDP keep the model in .module
    assert not sp.can_share(wrapper)


def test_a_model_that_disagrees_keeps_the_plain_forward(monkeypatch) -> None:
    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    model.train()
    batch = _batch()
    real = sp.shared_prefix_logits

    def wrong(*args, **kwargs):
        logits, selected = real(*args, **kwargs)
        return logits + 1.0 * torch.arange(logits.shape[-1]) / logits.shape[-1], selected

    monkeypatch.setattr("peftkit.train.loss.shared_prefix_logits", wrong)
    # fused_loss=False: the loss is taken from the (wrong) logits, not from the head's input
    plain, _ = lm_loss_sum(model, batch, share_prefix=False, fused_loss=False)
    with pytest.warns(UserWarning, match="shared-prefix forward gave loss"):
        loss, _ = lm_loss_sum(model, batch, fused_loss=False)
    assert sp._CHECKED.get(model) is False
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second check, no second warning
        lm_loss_sum(model, batch, fused_loss=False)


def test_bf16_autocast_passes_the_check() -> None:
    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    perturb_adapters(model)
    model.train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = lm_loss_sum(model, batch, share_prefix=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            shared, _ = lm_loss_sum(model, batch)
    assert sp._CHECKED.get(model) is True
    assert float(shared.detach()) == pytest.approx(float(plain.detach()), rel=2e-2)
