"""In-context learning baselines: k solved examples from the training split in front of each query.

Chat templates get the shots as earlier user/assistant turns; raw prompt/completion data gets them
concatenated. With k = 0 this is the zero-shot baseline (the prompt alone).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from peftkit.data.template import to_messages


def draw_shots(train: Sequence[dict[str, Any]], k: int, seed: int = 0, balance_key: str | None = "output",
               options: Sequence[str] | None = None, exclude: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``k`` training examples (seeded). With label ``options``, shots cycle through the labels so that a
    2-shot prompt shows both classes (a lone label biases small models towards it).

    ``exclude``: the query; no shot equals it (a query shown solved in its own prompt scores a copy, not the
    model). The pool is shuffled the same way for every query, so queries share their shots but for that one.
    """
    if k <= 0:
        return []
    rng = random.Random(seed)
    pool = list(train)
    rng.shuffle(pool)
    if exclude is not None:
        pool = [r for r in pool if r != exclude]
    if not options or balance_key is None:
        return pool[:k]
    by_label = {o: [r for r in pool if r.get(balance_key) == o] for o in options}
    shots = []
    for i in range(k):
        bucket = by_label[options[i % len(options)]]
        if bucket:
            shots.append(bucket.pop())
    rng.shuffle(shots)
    return shots


def with_shots(example: dict[str, Any], shots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``example`` with the shots in front, in a form the example's template renders."""
    if not shots:
        return example
    if "prompt" in example:
        head = "".join(s["prompt"] + s["completion"] + "\n\n" for s in shots)
        return {**example, "prompt": head + example["prompt"]}
    turns: list[dict[str, str]] = []
    for s in shots:
        turns += [m for m in to_messages(s) if m["role"] != "system"]
    own = to_messages(example)
    system = [m for m in own if m["role"] == "system"]
    rest = [m for m in own if m["role"] != "system"]
    out = {"messages": system + turns + rest}
    return {**out, "output": example["output"]} if "output" in example else out
