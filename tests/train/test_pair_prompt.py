"""Each pair's prompt run once: the same log-probabilities and adapter gradients as the plain forward, for pairs of
different prompt and answer lengths; the plain forward where the lever does not apply."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftkit
from peftkit.core.labels import IGNORE
from peftkit.train import pair_prompt
from peftkit.train.pair_prompt import applies, pair_prompt_lens, pair_prompt_logps
from peftkit.train.preference import pair_collate, sequence_logps
from tests.methods.test_invariants import METHODS, SPECS, adapted
from tests.tiny import make_tiny


def _pairs(prompt_lens: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(prompt_lens):
        prompt = torch.randint(3, 90, (p,), generator=g).tolist()
        chosen = torch.randint(3, 90, (2 + 2 * i,), generator=g).tolist()
        rejected = torch.randint(3, 90, (5 - i,), generator=g).tolist()
        out.append({"input_ids": prompt + chosen, "labels": [IGNORE] * p + chosen,
                    "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE] * p + rejected})
    return out


def _model(config: peftkit.core.config.MethodConfig) -> torch.nn.Module:
    model = make_tiny("llama").build()
    peftkit.inject(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.train()


def _grads(model: torch.nn.Module, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (logps * torch.linspace(1, 2, logps.numel())).sum().backward()  # rows weighted apart
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_prompt_lengths_stop_before_the_first_answer_logit() -> None:
    batch = pair_collate(_pairs([9, 12, 10]), pad_id=0)
    assert pair_prompt_lens(batch).tolist() == [8, 11, 9]  # the prompt's last token predicts the answer's first


def test_same_logps_and_gradients_as_the_plain_forward() -> None:
    model = _model(peftkit.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    batch = pair_collate(_pairs([9, 12, 10, 15]), pad_id=0)
    plain, counts = sequence_logps(model, batch)
    want = _grads(model, plain)
    shared, shared_counts = pair_prompt_logps(model, batch)
    got = _grads(model, shared)
    assert torch.equal(counts, shared_counts)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_where_it_does_not_apply() -> None:
    model = _model(peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not applies(model, pair_collate(_pairs([4, 12]), pad_id=0))  # a prompt shorter than MIN_PREFIX
    model.gradient_checkpointing_enable()
    assert not applies(model, pair_collate(_pairs([9, 12]), pad_id=0))
    model = _model(peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert applies(model, pair_collate(_pairs([9, 12]), pad_id=0))


@pytest.mark.parametrize("method", [m for m in METHODS if m in SPECS and "llama" in SPECS[m].kinds])
def test_every_method_gets_the_plain_result(method: str) -> None:
    """Per registered method: the first-use check decides without failing; where the lever applies (soft prompts
    too: their virtual tokens join the prompt's cache once), log-probabilities and gradients are the plain
    forward's."""
    model, _ = adapted(method, make_tiny("llama"))
    model.eval()  # no dropout: the check compares two forwards
    batch = pair_collate(_pairs([9, 12]), pad_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = applies(model, batch)
    assert pair_prompt._CHECKED.get(model) is ok
    if ok:
        plain = sequence_logps(model, batch)[0]
        want = _grads(model, plain)
        shared = pair_prompt_logps(model, batch)[0]
        got = _grads(model, shared)
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)
