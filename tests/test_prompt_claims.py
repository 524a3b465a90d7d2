"""Prompt-learning claims in miniature (the prompt_tiny table: tiny_clip, CoCoOp's base-to-new
protocol on `clutter_shapes`, 5 base / 5 new classes, 16 shots, cached image features, 3 seeds).

Slow (`make test-all`): the cells below are trained per seed in a shared fixture; with
`PROMPT_TINY_LOGS=<log dir of a prompt_tiny run>` the finished runs there are reused (same config
fingerprint), so the assertions can be checked on exactly the runs of the committed table
(results/cocoop_cvpr22/tiny.md).

Claims (issue 15; spec prompting_posthoc.md A6): CoOp raises base-class accuracy over zero-shot by
>= 10 points; KgCoOp keeps the new classes' text features close to zero-shot's (mean cosine >= 0.9)
and closer than CoOp's, at every seed. The papers' HM ordering (CoOp loses new classes, KgCoOp keeps
them) is printed as a diagnostic only: on tiny_clip it does not hold reliably (README, "Prompt
learning in miniature").
"""

from __future__ import annotations

import pytest
from _claims import seed_mean, table_runs

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)
ROWS = ("zs", "coop", "kgcoop")
COL = "clutter_shapes"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, int], dict[str, float]]:
    return table_runs(ROWS, COL, SEEDS, "PROMPT_TINY_LOGS", tmp_path_factory.mktemp("prompt_tiny"))


def test_coop_beats_zero_shot_on_base_classes_by_10(runs) -> None:
    """CoOp's base accuracy >= zero-shot's + 10 on the seed mean, and above it at every seed."""
    key = "test/base_acc"
    assert seed_mean(runs, "coop", key, SEEDS) >= seed_mean(runs, "zs", key, SEEDS) + 10.0
    for s in SEEDS:
        assert runs["coop", s][key] > runs["zs", s][key] + 5.0, s


def test_kgcoop_keeps_new_class_text_features_near_zero_shot(runs) -> None:
    """Mean cosine of the learned new-class text features to zero-shot's: KgCoOp >= 0.9 and above
    CoOp's at every seed."""
    key = "test/text_cos_new"
    for s in SEEDS:
        assert runs["kgcoop", s][key] >= 0.9, s
        assert runs["kgcoop", s][key] > runs["coop", s][key], s


def test_hm_ordering_diagnostic(runs) -> None:
    """Logged, not asserted: the papers' HM ordering (KgCoOp > CoOp, CoOp's new < zero-shot's)."""
    for s in SEEDS:
        print(
            f"seed {s}: "
            + ", ".join(
                f"{r} B/N/HM {runs[r, s]['test/base_acc']:.1f}/{runs[r, s]['test/new_acc']:.1f}/"
                f"{runs[r, s]['test/hm']:.1f}"
                for r in ROWS
            )
        )
    assert all(runs[r, s]["test/hm"] > 0 for r in ROWS for s in SEEDS)
