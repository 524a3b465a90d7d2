"""Deterministic k-shot sampling (CoOp protocol: per class, without replacement, seeded)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def sample_fewshot(labels: Sequence[int], num_shots: int | None, seed: int) -> list[int]:
    """Indices of `num_shots` items per class, in label-grouped order.

    Depends only on (labels, num_shots, seed): never on workers, devices or global RNG state. A class
    with fewer than `num_shots` items keeps all of them (CoOp behaviour). `None` keeps everything.
    """
    if num_shots is None:
        return list(range(len(labels)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    out: list[int] = []
    for y in sorted(by_class):
        items = by_class[y]
        out.extend(sorted(rng.sample(items, num_shots)) if len(items) > num_shots else items)
    return out
