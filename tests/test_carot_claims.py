"""CaRot's claims in miniature (the carot_tiny table: tiny_clip on robust_shapes, 3 seeds).

Slow (`make test-all`, ~25 min on 2 cores): every row of the table is trained per seed. Each cell runs
once per session in a shared fixture; with `CAROT_TINY_LOGS=<log dir of a carot_tiny run>` the
finished runs there are reused (same config fingerprint) and only missing ones are trained, so the
assertions can be checked on exactly the runs a committed table was built from.

The thresholds are the robust fine-tuning issue's; the margins measured are in README ("Robust
fine-tuning in miniature") and the issue's closing note.
"""

from __future__ import annotations

import pytest
from _claims import seed_mean, table_runs

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)
ROWS = (
    "zeroshot",
    "ft",
    "ft_random_head",
    "lp_ft",
    "flyp",
    "wise_ft",  # after ft: it reads the ft run of its seed
    "ft_long",
    "wise_ft_long",  # after ft_long
    "flyp_long",
    "carot_long",
)
SHIFTS = ("test_anywhere", "test_small_textured")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, int], dict[str, float]]:
    return table_runs(
        ROWS, "robust_shapes", SEEDS, "CAROT_TINY_LOGS", tmp_path_factory.mktemp("carot_tiny")
    )


def _mean(runs, row: str, key: str) -> float:
    return seed_mean(runs, row, key, SEEDS)


def test_ft_gains_far_in_distribution_and_loses_a_shifted_set(runs) -> None:
    """(i) FT >= ZS + 20 on ID at every seed; below ZS on at least one shifted set (mean)."""
    for s in SEEDS:
        assert runs["ft", s]["test/test/acc"] >= runs["zeroshot", s]["test/test/acc"] + 20
    assert any(
        _mean(runs, "ft", f"test/{t}/acc") < _mean(runs, "zeroshot", f"test/{t}/acc")
        for t in SHIFTS
    )


def test_wise_ft_beats_both_end_points_on_every_shifted_set(runs) -> None:
    """(ii) WiSE-FT (alpha 0.5) of the 300-step FT >= 2 points above that FT and above ZS on each
    shifted set (mean over seeds). Of the 150-step FT (row wise_ft) the midpoint gains 1.6-2.0
    over ZS on small textured shapes: asserted at 1 point (WISE150_OVER_ZS)."""
    for t in SHIFTS:
        wise = _mean(runs, "wise_ft_long", f"test/{t}/acc")
        assert wise >= _mean(runs, "ft_long", f"test/{t}/acc") + 2, t
        assert wise >= _mean(runs, "zeroshot", f"test/{t}/acc") + 2, t
        short = _mean(runs, "wise_ft", f"test/{t}/acc")
        assert short >= _mean(runs, "ft", f"test/{t}/acc") + 2, t
        assert short >= _mean(runs, "zeroshot", f"test/{t}/acc") + WISE150_OVER_ZS, t


def test_some_alpha_beats_both_end_points_by_2_points_at_every_seed(runs) -> None:
    """(ii) as the issue states it, at alpha 0.3 of the same WiSE-FT runs (every alpha is logged)."""
    for s in SEEDS:
        for t in SHIFTS:
            wise = runs["wise_ft", s][f"wise/alpha0.3/{t}/acc"]
            assert wise >= runs["ft", s][f"test/{t}/acc"] + 2, (s, t)
            assert wise >= runs["zeroshot", s][f"test/{t}/acc"] + 2, (s, t)


def test_flyp_keeps_shifted_accuracy_of_ft(runs) -> None:
    """(iii) FLYP's mean shifted accuracy >= FT's - 1.5 (mean over seeds)."""
    key = "test/avg_shift/acc"
    assert _mean(runs, "flyp", key) >= _mean(runs, "ft", key) - 1.5


def test_lp_ft_beats_ft_from_a_random_head_on_shifted_sets(runs) -> None:
    """(iv) LP-FT >> FT started from a random head (Kumar et al.), at every seed."""
    for s in SEEDS:
        key = "test/avg_shift/acc"
        assert runs["lp_ft", s][key] >= runs["ft_random_head", s][key] + LPFT_MARGIN


def test_carot_is_better_calibrated_than_flyp_under_shift_at_no_accuracy_cost(runs) -> None:
    """(v) Trained long (300 steps): CaRot's mean shifted ECE <= FLYP's - 3 points, at a mean
    shifted accuracy >= FLYP's - 1."""
    ece, acc = "test/avg_shift/ece", "test/avg_shift/acc"
    assert 100 * _mean(runs, "carot_long", ece) <= 100 * _mean(runs, "flyp_long", ece) - 3
    assert _mean(runs, "carot_long", acc) >= _mean(runs, "flyp_long", acc) - 1


# Measured at 96167c8 (results/carot_neurips24/tiny.md): WiSE-FT of the 150-step FT over ZS +6.7 on
# `anywhere` but only +1.7 on `small, textured` (seeds +1.6 to +2.0): asserted at 1 point there; the
# issue's 2 points are asserted on the 300-step pair.
WISE150_OVER_ZS = 1.0


def test_carot_raises_the_smallest_singular_value_of_id_features(runs) -> None:
    """The paper's motivating quantity (its Fig. 6): the orthogonality constraint enlarges σ_min of
    the ID image-feature covariance. Measured: CaRot ~1.1e-4 vs FLYP ~5.4e-5 at every seed."""
    for s in SEEDS:
        key = "test/sigma_min"
        assert runs["carot_long", s][key] >= 1.5 * runs["flyp_long", s][key], s


LPFT_MARGIN = 10.0
