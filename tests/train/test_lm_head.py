"""The LM head runs only at labelled positions (train/lm_head.py): same loss and gradients as full logits."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftkit
from peftkit.data.collate import pack_batch, pad_batch
from peftkit.data.tokenize import IGNORE
from peftkit.train import lm_head
from peftkit.train.lm_head import head_positions, labelled_positions, linear_cross_entropy_sum
from peftkit.train.loss import lm_loss_sum
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


# -- the fused head + cross-entropy (lm_head.linear_cross_entropy_sum, lm_loss_sum's default) ---------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_cross_entropy_equals_plain_loss_and_gradients(bias: bool, chunk_rows: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    hidden0, weight0 = torch.randn(10, 16, generator=g), torch.randn(VOCAB, 16, generator=g)
    bias0, target = torch.randn(VOCAB, generator=g) if bias else None, torch.randint(VOCAB, (10,), generator=g)

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        b = bias0.clone().requires_grad_() if bias else None
        if fused:
            loss = linear_cross_entropy_sum(h, w, b, target, chunk_rows)
        else:
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), target, reduction="sum")
        (0.5 * loss).backward()  # backward scales the gradients made in forward
        return loss.detach(), h.grad, w.grad, *((b.grad,) if bias else ())

    plain = run(False)
    for a, b in zip(run(True), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the loss alone, by chunks
        torch.testing.assert_close(linear_cross_entropy_sum(hidden0, weight0, bias0, target, chunk_rows), plain[0])


def _full_ft_llama() -> torch.nn.Module:
    return build_llama().train()  # untied head: its weight trains


@pytest.mark.parametrize("build", [lambda: _lora(build_llama), lambda: _lora(build_gpt2), _full_ft_llama,
                                   lambda: build_gpt2().train()],
                         ids=["llama-lora", "gpt2-lora-tied-head", "llama-full-ft", "gpt2-full-ft-tied-head"])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_fused_loss_same_loss_and_grads_and_no_logits(build, share_prefix: bool) -> None:
    model = build()
    examples = _examples(3)
    for e in examples:  # a shared 9-token prefix for the shared-prefix path
        e["input_ids"] = [7] * 9 + e["input_ids"]
        e["labels"] = [IGNORE] * 9 + e["labels"]
    batch = pad_batch(examples, pad_id=0)
    seen: list[torch.Size] = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))  # what it ran on

    def loss_and_grads(fused: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, _ = lm_loss_sum(model, batch, share_prefix=share_prefix, fused_loss=fused)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_loss, plain_grads = loss_and_grads(False)
    seen.clear()
    for _ in range(2):
        loss, grads = loss_and_grads(True)
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        for g, h in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)
    handle.remove()
    # the head ran once on the labelled positions (the first-use check: they fit one loss chunk), else on
    # nothing: no logits were made after that
    k = int((batch["labels"][:, 1:] != IGNORE).sum(dim=1).max())
    assert [s[1] for s in seen if s[1] != 0] == [k] and len(seen) >= 2


def test_model_that_changes_its_head_output_keeps_its_logits() -> None:
    """A model applying something after its head (soft-capping, a scale): the loss uses its logits."""
    model = _lora(build_llama)
    batch = pad_batch(_examples(), pad_id=0)
    model.register_forward_hook(lambda m, args, out: setattr(out, "logits", 30 * torch.tanh(out.logits / 30)) or out)
    capped, _ = lm_loss_sum(model, batch, fused_loss=False)
    with pytest.warns(UserWarning, match="changes its head's output"):
        loss, _ = lm_loss_sum(model, batch, fused_loss=True)
    assert float(loss.detach()) == pytest.approx(float(capped.detach()), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per model
        again, _ = lm_loss_sum(model, batch, fused_loss=True)
    assert float(again.detach()) == pytest.approx(float(capped.detach()), rel=1e-6)


def _capped(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` soft-capping its logits after the head (as Gemma 2 does), counting its forward calls."""
    model.calls = 0

    def cap(m, args, out):
        m.calls += 1
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.register_forward_hook(cap)
    return model


@pytest.mark.parametrize("share_prefix", [False, True])
def test_failed_head_check_reuses_the_forward_logits(share_prefix: bool) -> None:
    """A model that changes its head's output, fused loss on: the first call's loss and gradients come from the
    logits its one forward returned (the check ran the head on every labelled position), not from a second forward."""
    examples = _examples(3)
    for e in examples:  # a shared 9-token prefix, for the shared-prefix path
        e["input_ids"] = [7] * 9 + e["input_ids"]
        e["labels"] = [IGNORE] * 9 + e["labels"]
    batch = pad_batch(examples, pad_id=0)

    def loss_and_grads(model: torch.nn.Module, fused: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, _ = lm_loss_sum(model, batch, share_prefix=share_prefix, fused_loss=fused)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = _capped(_lora(build_llama))
    plain_loss, plain_grads = loss_and_grads(plain, fused=False)
    model = _capped(_lora(build_llama))
    if share_prefix:
        lm_loss_sum(model, batch, fused_loss=False)  # the shared-prefix check (plain forwards), out of the way
    model.calls = 0
    with pytest.warns(UserWarning, match="changes its head's output"):
        loss, grads = loss_and_grads(model, fused=True)
    assert model.calls == (2 if share_prefix else 1)  # one forward (the shared prefix is its own model call)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for g, h in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_failed_check_on_a_probe_runs_the_plain_loss(monkeypatch) -> None:
    """Labelled positions that do not fit one loss chunk are checked on a (B, 1) probe, whose logits cannot give
    the loss: a model failing that check runs its first batch again with the plain loss (once per model)."""
    monkeypatch.setattr(lm_head, "MIN_CHUNK_ROWS", 2)
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 1)  # chunks of 2 positions: B x K = 16 is checked on a probe
    model = _capped(_lora(build_llama))
    batch = pad_batch(_examples(), pad_id=0)
    capped, _ = lm_loss_sum(model, batch, fused_loss=False)
    model.calls = 0
    with pytest.warns(UserWarning, match="changes its head's output"):
        loss, _ = lm_loss_sum(model, batch, share_prefix=False)
    assert model.calls == 2 and float(loss.detach()) == pytest.approx(float(capped.detach()), rel=1e-6)
    model.calls = 0
    lm_loss_sum(model, batch, share_prefix=False)
    assert model.calls == 1  # remembered: the plain loss from then on


def test_train_fused_loss_setting_reaches_the_loss(tmp_path, monkeypatch) -> None:
    """The trainer's next-token loss follows ``train.fused_loss`` (the default: on)."""
    from peftkit.train import loop
    from peftkit.train import loss as loss_mod
    from peftkit.train.config import TrainConfig

    seen: list[bool] = []
    real = loss_mod.lm_loss_sum

    def spy(model, batch, **kw):
        seen.append(kw.get("fused_loss", True))
        return real(model, batch, **kw)

    monkeypatch.setattr(loss_mod, "lm_loss_sum", spy)
    for fused in (True, False):
        cfg = TrainConfig(max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0, save_every=0, eval_every=0,
                          fused_loss=fused)
        loop.Trainer(_lora(build_llama), _examples(), _examples(1), cfg, loop.Batching(0),
                     loop.Wiring(tmp_path / str(fused), show_progress=False)).fit()  # one step, then the final validation loss
        assert seen and set(seen) == {fused}
        seen.clear()
    assert TrainConfig().fused_loss is True
