"""Task mixing for multi-task runs: sampling proportions, without-replacement passes, determinism, the
sequential schedule, step splitting and task instructions."""

import math

import pytest

from peftkit.data.mixture import MixedOrder, SequentialOrder, split_steps, task_probabilities, with_instruction
from peftkit.errors import DataError


def mixed(sizes=(50, 30), weights=(3.0, 1.0), batch_size=4, seed=0, **kw) -> MixedOrder:
    lengths = [5 + (i % 7) for i in range(sum(sizes))]
    return MixedOrder(sizes, lengths, weights, batch_size, seed, **kw)


def test_probabilities_follow_weights_and_temperature():
    assert task_probabilities([3, 1]) == pytest.approx([0.75, 0.25])
    assert task_probabilities([2, 2, 4]) == pytest.approx([0.25, 0.25, 0.5])
    # T = 2: w^(1/2) -> 3:1 becomes sqrt(3):1
    assert task_probabilities([3, 1], temperature=2.0) == pytest.approx([math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)])
    for bad in ([0, 1], [-1, 1], [math.inf, 1], []):
        with pytest.raises(ValueError):
            task_probabilities(bad)
    with pytest.raises(ValueError):
        task_probabilities([1, 1], temperature=0)


def test_mixed_sampling_proportions_3_to_1():
    order = mixed()
    picks = [order.task_of(i) for epoch in range(100) for i in order.order(epoch)]  # 8,000 examples
    share = picks.count(0) / len(picks)
    assert abs(share - 0.75) <= 0.02, share
    # the batches of an epoch hold exactly the examples of its order
    batches = order(3)
    assert sorted(i for b in batches for i in b) == sorted(order.order(3))
    assert all(len(b) <= 4 for b in batches) and sum(len(b) == 4 for b in batches) >= len(batches) - 1


def test_temperature_flattens_the_mixture():
    order = mixed(weights=(9.0, 1.0), temperature=2.0)  # 3:1 after the temperature
    picks = [order.task_of(i) for epoch in range(100) for i in order.order(epoch)]
    assert abs(picks.count(0) / len(picks) - 0.75) <= 0.02


def test_tasks_are_sampled_without_replacement_in_passes():
    """Each task's examples come in shuffled passes: every example once per pass, across epoch boundaries."""
    order = mixed(sizes=(7, 5), weights=(1.0, 1.0))
    for task, (lo, n) in enumerate(((0, 7), (7, 5))):
        stream = [i - lo for e in range(20) for i in order.order(e) if order.task_of(i) == task]
        full = len(stream) // n
        assert full >= 5
        for p in range(full):
            assert sorted(stream[p * n:(p + 1) * n]) == list(range(n)), (task, p)


def test_mixed_order_is_deterministic_and_resumable():
    a, b = mixed(seed=1), mixed(seed=1)
    assert [a(e) for e in range(4)] == [b(e) for e in range(4)]
    assert mixed(seed=2)(0) != a(0)
    # a fresh sampler asked for epoch 5 first (a resumed run) agrees with one that went through 0..4
    fresh = mixed(seed=1)
    assert fresh(5) == a(5)
    assert fresh.consumed_before(5) == a.consumed_before(5)


def test_mixed_order_with_packing_budget():
    order = mixed(group_by_length=False, token_budget=20)
    lengths = order.lengths
    for b in order(0):
        assert sum(lengths[i] for i in b) <= 20 or len(b) == 1


def test_sequential_order_trains_tasks_one_after_another():
    sizes, steps = [10, 6], [3, 2]
    lengths = [4] * 16
    order = SequentialOrder(sizes, lengths, steps, batch_size=4, batches_per_step=2, seed=0)
    first, second = order(0), order(1)
    assert len(first) == 3 * 2 and len(second) == 2 * 2  # steps x grad_accum batches per phase
    assert all(i < 10 for b in first for i in b)
    assert all(10 <= i < 16 for b in second for i in b)
    # phase 0 needs 24 examples of a 10-example task: whole shuffled epochs, one after another
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10))
    assert [order.task_of_step(s) for s in range(1, 6)] == [0, 0, 0, 1, 1]
    assert order(0) == SequentialOrder(sizes, lengths, steps, 4, 2, seed=0)(0)
    assert all(10 <= i for b in order(2) for i in b)  # past the end (skipped batches): the last task goes on


@pytest.mark.parametrize("total, steps, weights, expected", [
    (10, [None, None], [1, 1], [5, 5]),
    (10, [None, None, None], [1, 1, 1], [4, 3, 3]),
    (12, [None, None], [3, 1], [9, 3]),
    (10, [4, None], [1, 1], [4, 6]),
    (10, [4, 6], [1, 1], [4, 6]),
    (3, [None, None, None], [1000, 1, 1], [1, 1, 1]),
])
def test_split_steps(total, steps, weights, expected):
    got = split_steps(total, steps, weights)
    assert got == expected and sum(got) == total


@pytest.mark.parametrize("total, steps, message", [
    (10, [4, 5], "add up to 9 but train.max_steps is 10"),
    (10, [10, None], "leaves 0 step(s) for 1 task(s)"),
])
def test_split_steps_errors(total, steps, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_steps(total, steps, [1] * len(steps))


def test_task_instruction_per_format():
    review = {"instruction": "Classify the sentiment.", "input": "A fine film.", "output": "positive"}
    assert with_instruction(review, "Is this review positive?") == {
        "instruction": "Is this review positive?", "input": "A fine film.", "output": "positive"}
    chat = {"instruction": "How are you?", "input": "", "output": "Fine."}  # chatterbot: the prompt becomes the input
    assert with_instruction(chat, "Reply briefly.") == {"instruction": "Reply briefly.", "input": "How are you?", "output": "Fine."}
    msgs = {"messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    assert with_instruction(msgs, "Be nice.")["messages"] == [
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert with_instruction({"prompt": "2+2=", "completion": "4"}, "Add.") == {"prompt": "Add.\n2+2=", "completion": "4"}
    with pytest.raises(DataError, match=r"data.tasks\[0\]: an instruction does not apply to plain text"):
        with_instruction({"text": "just text"}, "x", "data.tasks[0]")
    assert review["instruction"] == "Classify the sentiment."  # the input is not modified
