import torch

from peftkit.data.collate import batch_order, pack_batch, pad_batch
from peftkit.data.tokenize import IGNORE


def test_pad_batch_pads_to_longest_right_and_left():
    ex = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    b = pad_batch(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    left = pad_batch(ex, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pack_batch_restarts_positions_and_masks_boundary():
    ex = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    b = pack_batch(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert "attention_mask" not in b


def test_batch_order_deterministic_complete_and_grouped():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    a = batch_order(lengths, 8, seed=1, epoch=0)
    assert a == batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    random_spread = sum(
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batch_order(lengths, 8, 1, 0, group_by_length=False)
    ) / len(a)
    assert spread < random_spread / 4


def test_batch_order_token_budget():
    lengths = [10, 20, 30, 40, 50] * 10
    batches = batch_order(lengths, 4, seed=0, epoch=0, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 100 for b in batches)


def test_packed_forward_equals_separate_forwards(tiny_lm):
    model, _ = tiny_lm
    model.eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    packed = pack_batch([{"input_ids": a}, {"input_ids": b}], pad_id=0)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        sa = model(input_ids=torch.tensor([a])).logits[0]
        sb = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(out[:5], sa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[5:], sb, atol=1e-5, rtol=1e-4)
