import json

import pytest
import torch

import peftkit
from peftkit.data.collate import pack_batch, pad_batch
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.errors import TrainingError
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, Wiring
from peftkit.train.loss import evaluate_loss, lm_loss_sum
from tests.grads import assert_same_sums, record_step_grads

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 8


def encoded(tokenizer, rows=ROWS):
    return encode_all(Template.create(tokenizer), rows, 64).examples


def lora(model, **kw):
    torch.manual_seed(0)
    return peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", **kw))


def test_training_reduces_validation_loss(tiny_lm, tmp_path):
    model, tok = tiny_lm
    lora(model)
    data = encoded(tok)
    pad = tok.pad_token_id
    before = evaluate_loss(model, data, 8, pad)
    cfg = TrainConfig(max_steps=20, batch_size=8, lr=3e-2, warmup_steps=0, eval_every=10, save_every=0, log_every=5)
    state = Trainer(model, data, data[:8], cfg, Batching(pad), Wiring(tmp_path, show_progress=False)).fit()
    after = evaluate_loss(model, data, 8, pad)
    assert state.step == 20
    assert after < before - 3, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows if "loss" in r)


def test_only_trainable_parameters_change(tiny_lm, tmp_path):
    model, tok = tiny_lm
    lora(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, save_every=0, eval_every=0)
    Trainer(model, encoded(tok), [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_gradient_accumulation_matches_bigger_batch(tiny_lm_dir, tmp_path):
    """Each step's gradient (what the optimizer receives, after clipping) is the bigger batch's: the same tokens,
    the same scale. Compared with the weights held (tests/grads.py), so step 2 is compared at the same weights,
    on its own data; the weights after Adam steps would not do (its first update is about lr * sign(g), and a
    near-zero gradient element flipping sign under rounding moves by 2 * lr)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    data = encoded(tok)
    results = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        model = lora(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), init="random")
        cfg = TrainConfig(max_steps=2, batch_size=bs, grad_accum=accum, lr=1e-2, warmup_steps=0, save_every=0,
                          eval_every=0, schedule="constant")
        trainer = Trainer(model, data, [], cfg, Batching(tok.pad_token_id, group_by_length=False),
                          Wiring(tmp_path / f"{bs}", show_progress=False))
        steps = record_step_grads(trainer, hold_weights=True)
        trainer.fit()
        assert len(steps) == 2 and len(steps[0]) == 28  # 2 layers x 7 linears x (A, B)
        results.append(steps)
    first, second = results[0]
    assert all(not torch.allclose(first[k], second[k], rtol=0.01) for k in first)  # step 2 ran on other data
    # Only the summation order differs. The longest reduction on a gradient's path is the tied head's backward over
    # the 49152-token vocabulary: worst case 49152 * 2^-24 = 2.9e-3 of the scale, never approached (rounding errors
    # of a long sum add like a random walk: sqrt(49152) * 2^-24 = 1.3e-5); the step's 8 x 38 positions and the
    # widths 32/64 add ~1e-6. 1e-4 of each tensor's scale (seen here: 5e-6) is far below a wrong sum (>= 1%).
    for other in results[1:]:
        for step, expected in zip(other, results[0]):
            assert_same_sums(step, expected, rtol=1e-4)


def record_step_examples(monkeypatch):
    """``{(run, step): sorted example indices}`` drawn for each optimizer step, by every Trainer made after."""
    seen: dict[tuple[str, int], list[int]] = {}
    real = Trainer._next_batch

    def spy(self):
        out = real(self)
        key = (self.output_dir.name, self.state.step)
        seen[key] = sorted(seen.get(key, []) + list(self._batches[self.state.batch_in_epoch - 1]))
        return out

    monkeypatch.setattr(Trainer, "_next_batch", spy)
    return seen


def test_accumulated_step_draws_the_larger_batchs_examples(tiny_lm_dir, tmp_path, monkeypatch):
    """Issue #23 item 11: with length grouping (the default), an optimizer step of batch_size 4 x grad_accum 2
    trains on the examples of the batch_size 8 step (same seed), also across epochs with a short last batch
    (30 examples: 8, 8, 8, 6 per epoch), and a resumed run continues with the same steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.collate import batch_order

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    rows = [{"instruction": "Say the color of " + "very " * (i % 7) + w, "input": "", "output": c}
            for i, (w, c) in enumerate([("grass", "green"), ("sky", "blue"), ("snow", "white")] * 10)]
    data = encoded(tok, rows)
    lengths = [len(e["input_ids"]) for e in data]
    assert len(data) == 30 and len(set(lengths)) == 7
    # what this guards against: consecutive pairs of length-grouped batches of 4 are not the batches of 8
    pairs = batch_order(lengths, 4, 0, 0)
    assert ({frozenset(a + b) for a, b in zip(pairs[::2], pairs[1::2])}
            != {frozenset(b) for b in batch_order(lengths, 8, 0, 0)})

    seen = record_step_examples(monkeypatch)
    for bs, accum, run in ((8, 1, "big"), (4, 2, "accum"), (2, 4, "accum4")):
        model = lora(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))
        cfg = TrainConfig(max_steps=10, batch_size=bs, grad_accum=accum, lr=1e-2, warmup_steps=0, save_every=3,
                          eval_every=0, log_every=1)
        Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path / run, show_progress=False)).fit()
    big = [seen["big", s] for s in range(10)]
    assert sorted(map(len, big[:4])) == sorted(map(len, big[4:8])) == [6, 8, 8, 8]  # (the short one anywhere)
    assert [seen["accum", s] for s in range(10)] == big
    assert [seen["accum4", s] for s in range(10)] == big
    epochs = [[r["epoch"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in ("big", "accum")]
    assert epochs[0] == epochs[1]  # steps end at the same epoch boundaries

    model = lora(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))  # resume the accumulating run at step 6
    cfg = TrainConfig(max_steps=10, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=0, save_every=0, eval_every=0)
    resumed = Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path / "resumed", show_progress=False))
    resumed.fit(resume_from=tmp_path / "accum" / "checkpoints" / "step-000006")
    assert [seen["resumed", s] for s in range(6, 10)] == big[6:]


def test_packed_loss_equals_padded_loss(tiny_lm):
    model, tok = tiny_lm
    model.eval()
    data = encoded(tok, ROWS[:4])
    with torch.no_grad():
        padded, n1 = lm_loss_sum(model, pad_batch(data, tok.pad_token_id))
        packed, n2 = lm_loss_sum(model, pack_batch(data, tok.pad_token_id))
    assert n1 == n2 > 0
    torch.testing.assert_close(packed, padded, atol=1e-3, rtol=1e-5)


def test_packing_trains(tiny_lm, tmp_path):
    model, tok = tiny_lm
    lora(model)
    data = encoded(tok)
    before = evaluate_loss(model, data, 8, tok.pad_token_id)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=3e-2, warmup_steps=0, save_every=0, eval_every=0)
    Trainer(model, data, [], cfg, Batching(tok.pad_token_id, packing=True, max_length=64),
            Wiring(tmp_path, show_progress=False)).fit()
    assert evaluate_loss(model, data, 8, tok.pad_token_id) < before - 2


def test_nan_loss_stops_with_step(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    lora(model)
    cfg = TrainConfig(max_steps=5, batch_size=4, save_every=0, eval_every=0)
    trainer = Trainer(model, encoded(tok), [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False))
    import peftkit.train.loss as loss_mod

    real = loss_mod.lm_loss_sum
    calls = {"n": 0}

    def poisoned(m, batch):
        loss, n = real(m, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    monkeypatch.setattr(loss_mod, "lm_loss_sum", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        trainer.fit()


def test_bf16_autocast_trains_with_fp32_adapter(tiny_lm, tmp_path):
    model, tok = tiny_lm
    lora(model)
    data = encoded(tok)
    before = evaluate_loss(model, data, 8, tok.pad_token_id)
    cfg = TrainConfig(max_steps=8, batch_size=4, lr=5e-2, warmup_steps=0, save_every=0, eval_every=0, precision="bf16")
    Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert evaluate_loss(model, data, 8, tok.pad_token_id) < before - 2


def test_gradient_checkpointing_same_gradients(tiny_lm):
    model, tok = tiny_lm
    lora(model, init="random")
    batch = pad_batch(encoded(tok, ROWS[:4]), tok.pad_token_id)

    def grads():
        model.zero_grad()
        loss, n = lm_loss_sum(model, batch, share_prefix=False)  # checkpointing turns prefix sharing off: like with like
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    model.train()
    plain = grads()
    from peftkit.train.loop import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


def test_peak_memory_can_be_reset_between_runs():
    import ctypes
    import mmap

    from peftkit.train.tracking import peak_memory_mb, reset_peak_memory

    size = 256 * 2**20
    drops = []
    for _ in range(3):  # the kernel's RSS counters are per-CPU estimates: one clean drop is the evidence asked for
        # a fresh anonymous mapping, touched and unmapped: a torch tensor could land in heap memory already resident
        # from earlier tests (glibc reuses a big enough free chunk before it maps), and then RSS would not move
        region = mmap.mmap(-1, size)
        view = ctypes.c_char.from_buffer(region)
        ctypes.memset(ctypes.addressof(view), 1, size)
        del view
        region.close()
        high = peak_memory_mb()
        reset_peak_memory()
        drops.append(high - peak_memory_mb())
        if drops[-1] > 128:
            break
    assert max(drops) > 128, drops
