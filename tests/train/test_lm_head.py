"""The LM head runs only at labelled positions (train/lm_head.py): same loss and gradients as full logits."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.data.collate import pack_batch, pad_batch
from peftkit.data.tokenize import IGNORE
from peftkit.train.lm_head import head_positions, labelled_positions
from peftkit.train.loop import lm_loss_sum
from tests.tiny import VOCAB, build_gpt2, build_llama, perturb_adapters


def _examples(seed: int = 0) -> list[dict[str, list[int]]]:
    """Variable-length examples whose labels cover only the tail (a response), as response-only loss gives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in ((9, 3), (14, 2), (6, 4), (11, 1)):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n - k) + ids[n - k:]})
    return out


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool) -> tuple[float, int, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, n = lm_loss_sum(model, batch, labelled_only=labelled_only)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(loss.detach()), n, grads


def _lora(build) -> torch.nn.Module:
    model = build()
    peftkit.inject(model, peftkit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    perturb_adapters(model)
    return model.train()


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2-tied-head"])
@pytest.mark.parametrize("collate", ["pad", "pack"])
def test_same_loss_and_grads_as_full_logits(build, collate: str) -> None:
    model = _lora(build)
    examples = _examples()
    batch = pad_batch(examples, pad_id=0) if collate == "pad" else pack_batch(examples, pad_id=0)
    full_loss, full_n, full_grads = _loss_and_grads(model, batch, labelled_only=False)
    loss, n, grads = _loss_and_grads(model, batch, labelled_only=True)
    assert n == full_n == sum(1 for e in examples for t in e["labels"][1:] if t != IGNORE)
    assert loss == pytest.approx(full_loss, rel=1e-5, abs=1e-5)
    assert len(grads) == len(full_grads) > 0
    for g, h in zip(grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_head_gradient_matches() -> None:
    """The head's own weight gradient (full FT, untied head) is the same with the selection."""
    model = build_llama().train()
    batch = pad_batch(_examples(1), pad_id=0)
    full_loss, _, full_grads = _loss_and_grads(model, batch, labelled_only=False)
    loss, _, grads = _loss_and_grads(model, batch, labelled_only=True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for g, h in zip(grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_head_sees_only_labelled_positions() -> None:
    model = build_llama()
    batch = pad_batch(_examples(), pad_id=0)
    target = batch["labels"][:, 1:]
    index, picked = labelled_positions(target)
    assert index.shape == picked.shape == (4, 4)  # K = the most labels in a row (the 6-token example's 4)
    for row in range(4):  # each row's labelled positions first, in order; the rest of the row ignored
        mine = (target[row] != IGNORE).nonzero().flatten()
        assert index[row, :mine.numel()].tolist() == mine.tolist()
        assert picked[row, :mine.numel()].tolist() == target[row, mine].tolist()
        assert (picked[row, mine.numel():] == IGNORE).all()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with head_positions(model, index, batch["input_ids"].shape[1]) as applied:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle.remove()
    assert applied[0] and seen == [torch.Size([4, 4, VOCAB])] and logits.shape[1] == 4
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    torch.testing.assert_close(logits, plain.gather(1, index.unsqueeze(-1).expand(-1, -1, VOCAB)))


def test_no_labels_gives_zero_loss() -> None:
    model = _lora(build_llama)
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [IGNORE] * 3}], pad_id=0)
    loss, n = lm_loss_sum(model, batch)
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()  # still a graph: a batch without labels does not break the step


def test_soft_prompt_prepended_positions() -> None:
    """Prompt tuning prepends virtual tokens: the head's input is longer than the caller's tokens."""
    model = build_llama()
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=3))
    perturb_adapters(model)
    model.train()
    batch = pad_batch(_examples(2), pad_id=0)
    full_loss, _, full_grads = _loss_and_grads(model, batch, labelled_only=False)
    loss, _, grads = _loss_and_grads(model, batch, labelled_only=True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for g, h in zip(grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_model_without_output_embeddings_gets_full_logits() -> None:
    """An unknown model (no get_output_embeddings): the plain path, same loss."""

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_llama()

        def forward(self, **kw):
            return self.inner(**kw)

    model = Plain()
    batch = pad_batch(_examples(), pad_id=0)
    a, n = lm_loss_sum(model, batch)
    b, m = lm_loss_sum(model, batch, labelled_only=False)
    assert n == m and float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)
