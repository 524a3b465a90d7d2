"""k-shot sampling: CoOp's protocol, deterministic in (labels, k, seed) only, cached next to the data."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from reprolab.data import fewshot
from reprolab.data.fewshot import (
    cached_fewshot_indices,
    fewshot_indices,
    fewshot_splits,
    sample_fewshot,
)
from reprolab.data.spec import get_spec

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_data_tree import make_coop_tree  # noqa: E402

LABELS = [y for y in range(7) for _ in range(10 + 3 * y)]  # 7 classes, 10..28 items each
random.Random(0).shuffle(LABELS)


def _dassl_reference(train, val, k, seed):
    """CoOp/Dassl's procedure with the global RNG: seed once, train then val, first-appearance order."""
    state = random.getstate()
    random.seed(seed)
    try:
        out = []
        for labels, kk in ((train, k), (val, min(k, 4))):
            tracker = defaultdict(list)
            for i, y in enumerate(labels):
                tracker[y].append(i)
            picked = []
            for _, items in tracker.items():
                picked.extend(random.sample(items, kk) if len(items) >= kk else items)
            out.append(picked)
        return out
    finally:
        random.setstate(state)


def test_k_per_class_and_small_classes_kept():
    idx = sample_fewshot(LABELS, 12, seed=1)
    counts = Counter(LABELS[i] for i in idx)
    assert counts[0] == 10  # fewer than k: all kept
    assert all(counts[y] == 12 for y in range(1, 7))
    assert len(set(idx)) == len(idx)


def test_same_seed_same_indices_regardless_of_global_state():
    a = sample_fewshot(LABELS, 4, seed=3)
    random.seed(12345)
    import numpy as np
    import torch

    np.random.seed(7)
    torch.manual_seed(7)
    b = sample_fewshot(list(LABELS), 4, seed=3)
    assert a == b


def test_different_seed_different_indices():
    assert sample_fewshot(LABELS, 4, seed=1) != sample_fewshot(LABELS, 4, seed=2)


def test_replays_coop_random_consumption_train_then_val():
    val = [y for y in range(7) for _ in range(6)]
    for seed in (1, 2, 3):
        out = fewshot_indices(LABELS, val, 16, seed)
        ref_train, ref_val = _dassl_reference(LABELS, val, 16, seed)
        assert out["train"] == ref_train and out["val"] == ref_val
        assert all(v == 4 for v in Counter(val[i] for i in out["val"]).values())  # min(k, 4)
        # the train subset does not depend on whether val is sampled
        assert sample_fewshot(LABELS, 16, seed) == out["train"]


def test_none_keeps_everything():
    out = fewshot_indices(LABELS, [0, 1], None, 1)
    assert out["train"] == list(range(len(LABELS))) and out["val"] == [0, 1]
    with pytest.raises(ValueError):
        fewshot_indices(LABELS, None, 0, 1)


def test_cache_written_then_reused(tmp_path, monkeypatch):
    first = cached_fewshot_indices(LABELS, LABELS, 2, 5, tmp_path)
    path = tmp_path / "shot_2-seed_5.json"
    data = json.loads(path.read_text())
    assert data["train"] == first["train"] and data["seed"] == 5 and data["num_shots"] == 2

    def boom(*a, **k):
        raise AssertionError("resampled although the cache matches")

    monkeypatch.setattr(fewshot, "fewshot_indices", boom)
    assert cached_fewshot_indices(LABELS, LABELS, 2, 5, tmp_path) == first


def test_stale_cache_is_resampled(tmp_path):
    cached_fewshot_indices(LABELS, None, 2, 1, tmp_path)
    other = [y % 3 for y in range(30)]
    out = cached_fewshot_indices(other, None, 2, 1, tmp_path)
    assert out == fewshot_indices(other, None, 2, 1)


def test_unwritable_cache_dir_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = cached_fewshot_indices(LABELS, None, 2, 1, blocker / "sub")  # cannot mkdir under a file
    assert out["train"] == sample_fewshot(LABELS, 2, 1)


def test_fewshot_splits_cache_next_to_the_data(tmp_path):
    make_coop_tree(tmp_path, "dtd", per_class=(3, 2, 1), size=8)
    spec = get_spec("dtd")
    out = fewshot_splits(spec, tmp_path, num_shots=2, seed=1)
    assert len(out["train"]) == 47 * 2 and len(out["val"]) == 47 * 2
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_1.json"
    assert cache.is_file()
    again = fewshot_splits(get_spec("dtd"), tmp_path, num_shots=2, seed=1)
    assert again["train"].labels == out["train"].labels
    assert out["train"][0]["image"].mode == "RGB"


def test_fewshot_splits_of_a_synthetic_spec_are_not_cached(tmp_path):
    spec = get_spec("shapes")  # rendered in memory: no dataset folder
    assert fewshot.fewshot_cache_dir(spec, tmp_path) is None
    out = fewshot_splits(spec, tmp_path, num_shots=3, seed=2)
    train = spec.load(tmp_path, "train")
    assert out["train"].labels == [train.labels[i] for i in sample_fewshot(train.labels, 3, 2)]
    assert Counter(out["val"].labels) == dict.fromkeys(range(10), 3)
    assert not list(tmp_path.iterdir())
