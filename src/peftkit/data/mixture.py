"""Several tasks in one run: the order in which their training examples are seen (no model code).

Two ways to combine tasks, as in the FLAN/T5 multi-task papers (Wei et al. 2021, arXiv:2109.01652;
Raffel et al. 2020, arXiv:1910.10683 sec. 3.5.2):

* **mixed** -- every training example's task is drawn at random, task ``t`` with probability

      p_t = w_t^(1/T) / sum_s w_s^(1/T)          (w: the task weights, T: the temperature)

  so weights 3:1 give 75% / 25% of the examples; T > 1 flattens the mixture towards uniform.
  Inside a task, examples are taken without replacement from a shuffled pass over the task, and a
  new shuffled pass begins when one is used up (a small task with a large weight is repeated; a large
  task with a small weight is sub-sampled). One "epoch" of the mixture is as many examples as all
  tasks hold together.
* **sequential** -- task 1 for its steps, then task 2, ...: phase ``k`` of the run is ``steps_k`` optimizer
  steps of task ``k`` alone (``steps_k x grad_accum`` batches), cycling through the task's shuffled epochs.

Both orders are pure functions of ``(seed, epoch)`` -- the trainer's data position is ``(epoch, batch)`` --
so a run resumed from a checkpoint continues exactly the same order. Example indices are global:
task ``t``'s examples occupy ``offsets[t] : offsets[t] + sizes[t]`` of the concatenated training set.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from peftkit.data.collate import batch_order, batches_from_order
from peftkit.errors import DataError


def task_probabilities(weights: Sequence[float], temperature: float = 1.0) -> list[float]:
    """``w_t^(1/T)`` normalised to sum to 1.

    Raises:
        ValueError: a weight that is not a finite number > 0, or a temperature that is not > 0.
    """
    if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"task weights must be finite numbers > 0, got {list(weights)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    scaled = [w ** (1.0 / temperature) for w in weights]
    total = sum(scaled)
    return [s / total for s in scaled]


def offsets_of(sizes: Sequence[int]) -> list[int]:
    """Start of each task's examples in the concatenated set."""
    return [0, *itertools.accumulate(sizes)][:-1]


class MixedOrder:
    """Batches of one mixture epoch: ``order(epoch) -> [[global example index, ...], ...]``.

    Args:
        sizes: training examples per task.
        lengths: token length of every example (global indices), for length grouping and packing.
        weights: sampling weight per task.
        batch_size: examples per (global) batch.
        seed: the run's seed.
        temperature: mixing temperature (1: proportional to the weights).
        group_by_length / token_budget: as :func:`peftkit.data.collate.batch_order`.
    """

    def __init__(self, sizes: Sequence[int], lengths: Sequence[int], weights: Sequence[float], batch_size: int,
                 seed: int = 0, temperature: float = 1.0, group_by_length: bool = True,
                 token_budget: int | None = None) -> None:
        if len(sizes) != len(weights) or sum(sizes) != len(lengths) or min(sizes, default=0) <= 0:
            raise ValueError("every task needs training examples, and sizes, weights and lengths must agree")
        self.sizes, self.lengths, self.batch_size = list(sizes), list(lengths), batch_size
        self.probs = task_probabilities(weights, temperature)
        self.cum = list(itertools.accumulate(self.probs))
        self.offsets = offsets_of(sizes)
        self.seed, self.group_by_length, self.token_budget = seed, group_by_length, token_budget
        self.epoch_size = sum(sizes)
        self._consumed: dict[int, list[int]] = {0: [0] * len(sizes)}  # epoch -> examples used per task before it

    def draws(self, epoch: int) -> list[int]:
        """The task of each position of the epoch (``epoch_size`` independent draws)."""
        rng = random.Random(f"peftkit-mix:{self.seed}:{epoch}")
        return rng.choices(range(len(self.sizes)), cum_weights=self.cum, k=self.epoch_size)

    def consumed_before(self, epoch: int) -> list[int]:
        """Examples of each task used by the epochs before ``epoch`` (replayed from the draws, cached)."""
        start = max(e for e in self._consumed if e <= epoch)
        counts = list(self._consumed[start])
        for e in range(start, epoch):
            for t in self.draws(e):
                counts[t] += 1
            self._consumed[e + 1] = list(counts)
        return counts

    def order(self, epoch: int) -> list[int]:
        """Global example indices of the epoch, in the order drawn."""
        draws = self.draws(epoch)
        cursor = self.consumed_before(epoch)
        needed = [0] * len(self.sizes)
        for t in draws:
            needed[t] += 1
        streams = [iter(self._stream(t, cursor[t], needed[t])) for t in range(len(self.sizes))]
        return [self.offsets[t] + next(streams[t]) for t in draws]

    def _stream(self, task: int, start: int, count: int) -> list[int]:
        """Items ``start : start + count`` of the task's endless sequence of shuffled passes."""
        n = self.sizes[task]
        out: list[int] = []
        for k in range(start // n, (start + count + n - 1) // n):
            perm = list(range(n))
            random.Random(f"peftkit-mix:{self.seed}:task{task}:pass{k}").shuffle(perm)
            lo, hi = max(start - k * n, 0), min(start + count - k * n, n)
            out += perm[lo:hi]
        return out

    def __call__(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"peftkit-mix-batches:{self.seed}:{epoch}")
        return batches_from_order(self.order(epoch), self.lengths, self.batch_size, rng, self.group_by_length,
                                  self.token_budget)

    def task_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1


class SequentialOrder:
    """Batches of the run, one task after another: "epoch" ``k`` is task ``k``'s phase.

    Args:
        sizes / lengths / batch_size / seed / group_by_length / token_budget: as :class:`MixedOrder`.
        steps: optimizer steps of each task, in order.
        batches_per_step: batches per optimizer step (gradient accumulation).

    A skipped bad batch (``train.on_nan=skip``) still uses up a batch of its phase, so the next task then
    begins that many steps early; after the last phase the last task goes on.
    """

    def __init__(self, sizes: Sequence[int], lengths: Sequence[int], steps: Sequence[int], batch_size: int,
                 batches_per_step: int = 1, seed: int = 0, group_by_length: bool = True,
                 token_budget: int | None = None) -> None:
        if len(sizes) != len(steps) or sum(sizes) != len(lengths) or min(sizes, default=0) <= 0 or min(steps) <= 0:
            raise ValueError("every task needs training examples and steps, and sizes, steps and lengths must agree")
        self.sizes, self.lengths, self.steps = list(sizes), list(lengths), list(steps)
        self.offsets = offsets_of(sizes)
        self.batch_size, self.batches_per_step, self.seed = batch_size, batches_per_step, seed
        self.group_by_length, self.token_budget = group_by_length, token_budget
        self.step_ends = list(itertools.accumulate(steps))  # the last step of each phase

    def _task_epoch(self, task: int, epoch: int) -> list[list[int]]:
        lengths = self.lengths[self.offsets[task]: self.offsets[task] + self.sizes[task]]
        local = batch_order(lengths, self.batch_size, self.seed * 1_000 + task, epoch, self.group_by_length,
                            self.token_budget)
        return [[self.offsets[task] + i for i in b] for b in local]

    def __call__(self, epoch: int) -> list[list[int]]:
        last = len(self.sizes) - 1
        if epoch > last:  # only reached when bad batches were skipped: the last task goes on
            return self._task_epoch(last, 1_000_000 + epoch)
        needed = self.steps[epoch] * self.batches_per_step
        batches: list[list[int]] = []
        for task_epoch in itertools.count():
            batches += self._task_epoch(epoch, task_epoch)
            if len(batches) >= needed:
                return batches[:needed]
        raise AssertionError("unreachable")  # pragma: no cover

    def task_of_step(self, step: int) -> int:
        """The task trained at optimizer step ``step`` (1-based)."""
        return min(bisect.bisect_left(self.step_ends, step), len(self.steps) - 1)

    def task_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1


def split_steps(total: int, steps: Sequence[int | None], weights: Sequence[float]) -> list[int]:
    """Steps of each task in a sequential run: given ones as they are; the rest of ``total`` shared by
    the tasks without steps in proportion to their weights (largest remainders; at least 1 each).

    Raises:
        ValueError: the given steps leave no room, or do not add up to ``total`` when all are given.
    """
    given = sum(s for s in steps if s is not None)
    free = [i for i, s in enumerate(steps) if s is None]
    if not free:
        if given != total:
            raise ValueError(f"the tasks' steps add up to {given} but train.max_steps is {total}")
        return [int(s) for s in steps]  # type: ignore[arg-type]
    left = total - given
    if left < len(free):
        raise ValueError(f"train.max_steps={total} leaves {left} step(s) for {len(free)} task(s) without steps")
    share = [weights[i] for i in free]
    exact = [left * w / sum(share) for w in share]
    alloc = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(free)), key=lambda j: exact[j] - int(exact[j]), reverse=True)
    for j in itertools.islice(itertools.cycle(by_remainder), max(left - sum(alloc), 0)):
        alloc[j] += 1
    while sum(alloc) > left:  # the max(1, .) floor took too much: take it back from the largest
        alloc[alloc.index(max(alloc))] -= 1
    out = list(steps)
    for j, i in enumerate(free):
        out[i] = alloc[j]
    return [int(s) for s in out]  # type: ignore[arg-type]


def with_instruction(example: dict[str, Any], instruction: str, where: str = "task") -> dict[str, Any]:
    """``example`` carrying the task instruction (a copy).

    * alpaca: the instruction takes the ``instruction`` field; an example without ``input`` keeps its own
      instruction as the input (a chatterbot prompt stays the thing answered), one with an input loses it
      (rotten-tomatoes' built-in instruction is replaced);
    * chat: a system message (replacing an existing one);
    * prompt_completion: the instruction and a newline before the prompt.

    Raises:
        DataError: plain ``text`` examples (there is no prompt to instruct).
    """
    if "messages" in example:
        rest = [m for m in example["messages"] if m["role"] != "system"]
        return {**example, "messages": [{"role": "system", "content": instruction}, *rest]}
    if "prompt" in example:
        return {**example, "prompt": f"{instruction}\n{example['prompt']}"}
    if "instruction" in example:
        own_input = example.get("input") or ""
        return {**example, "instruction": instruction, "input": own_input or example["instruction"]}
    raise DataError(f"{where}: an instruction does not apply to plain text examples (no prompt)")


__all__ = ["MixedOrder", "SequentialOrder", "offsets_of", "split_steps", "task_probabilities", "with_instruction"]
