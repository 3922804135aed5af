"""split_padded (data/collate.py): a long row apart from short ones; the loss sums stay the batch's."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.data.collate import pad_batch, split_padded
from peftkit.data.tokenize import IGNORE
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, Wiring
from peftkit.train.loss import lm_loss_sum
from tests.grads import FP32_U, assert_same_sums, record_step_grads
from tests.tiny import VOCAB, build_llama


def _examples(lengths: list[int], prefix: int = 0, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, VOCAB, (prefix,), generator=g).tolist()
    out = []
    for n in lengths:
        ids = head + torch.randint(3, VOCAB, (n - prefix,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return out


def test_an_outlier_row_goes_apart() -> None:
    batch = pad_batch(_examples([10, 12, 11, 60, 9, 12]), pad_id=0)
    subs = split_padded(batch)
    assert [tuple(s["input_ids"].shape) for s in subs] == [(5, 12), (1, 60)]
    def rows(b):
        return sorted(str(ids[: int(m.sum())].tolist() + lab[: int(m.sum())].tolist())
                      for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]))

    assert sorted(r for s in subs for r in rows(s)) == rows(batch)  # every row once, unchanged


def test_similar_rows_stay_together() -> None:
    batch = pad_batch(_examples([30, 31, 33, 32]), pad_id=0)
    assert split_padded(batch) == [batch]
    single = pad_batch(_examples([30]), pad_id=0)
    assert split_padded(single) == [single]


def test_a_shared_prefix_keeps_rows_together() -> None:
    """Apart, each sub-batch runs the shared prefix again: worth it only when the padding saved exceeds that."""
    lengths = [40, 40, 40, 46]
    assert len(split_padded(pad_batch(_examples(lengths), pad_id=0), overhead=0)) == 2
    assert len(split_padded(pad_batch(_examples(lengths, prefix=30), pad_id=0), overhead=0)) == 1


def test_left_padded_or_packed_batches_are_left_alone() -> None:
    left = pad_batch(_examples([10, 40]), pad_id=0, side="left")
    assert split_padded(left) == [left]
    packed = {"input_ids": torch.ones(1, 20, dtype=torch.long), "labels": torch.ones(1, 20, dtype=torch.long)}
    assert split_padded(packed) == [packed]


def test_loss_sums_are_the_batchs() -> None:
    model = build_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    batch = pad_batch(_examples([10, 12, 11, 60, 9, 12]), pad_id=0)
    whole, n = lm_loss_sum(model, batch)
    parts = [lm_loss_sum(model, s) for s in split_padded(batch)]
    assert len(parts) == 2 and sum(p[1] for p in parts) == n
    assert float(sum(p[0] for p in parts).detach()) == pytest.approx(float(whole.detach()), rel=1e-5)


def test_trainer_step_is_the_same_with_and_without_splitting(tmp_path) -> None:
    """The step's gradients (what the optimizer receives) are the same, not the weights after it: Adam's first
    update is about lr * sign(g), so a near-zero gradient element whose sign flips under rounding would move its
    weight by 2 * lr (tests/grads.py)."""
    data = _examples([10, 12, 11, 60, 9, 12, 13, 10])
    cfg = TrainConfig(max_steps=1, batch_size=8, lr=1e-2, warmup_steps=0, save_every=0, eval_every=0, max_grad_norm=0)
    grads = {}
    for split in (True, False):
        model = build_llama()
        peftkit.inject(model, peftkit.LoraConfig(r=4, init="random"))
        calls = []
        handle = model.register_forward_hook(lambda m, a, out: calls.append(1))
        trainer = Trainer(model, data, [], cfg, Batching(0, split_padding=split),
                          Wiring(tmp_path / str(split), show_progress=False))
        steps = record_step_grads(trainer)
        trainer.fit()
        handle.remove()
        assert len(calls) == (2 if split else 1) and len(steps) == 1
        grads[split] = steps[0]
    assert len(grads[False]) == 2 * 2 * 2  # 2 layers x q/v x (A, B): every adapter tensor got a gradient
    # Only the summation order differs (the long row's tokens are summed apart, then added): a gradient element
    # sums over the step's 8 x 60 padded positions, through reductions over the widths of the 2-layer chain
    # (hidden 32, intermediate 64, vocab 100: ~300 terms in all), so n = 800: 800 * 2^-24 = 4.8e-5 of each
    # tensor's scale (seen here: 5e-7).
    assert_same_sums(grads[True], grads[False], rtol=(8 * 60 + 300) * FP32_U)


def test_tensors_not_aligned_with_input_ids_keep_the_batch_whole() -> None:
    batch = pad_batch(_examples([10, 12, 11, 60, 9, 12]), pad_id=0)
    labels = torch.randint(3, VOCAB, batch["labels"].shape)  # e.g. seq2seq decoder labels of the same width
    assert split_padded({**batch, "labels": labels}) == [{**batch, "labels": labels}]
    extra = {**batch, "decoder_input_ids": batch["input_ids"].clone()}
    assert split_padded(extra) == [extra]
    per_row = {**batch, "class_label": torch.arange(6)}
    assert [s["class_label"].tolist() for s in split_padded(per_row)] == [[0, 1, 2, 4, 5], [3]]
