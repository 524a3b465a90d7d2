"""Group robustness claims in miniature (the group_tiny table: tiny_clip on group_shapes, spec §1.8's
synthetic vectors and §2.5's two-core variant, 3 seeds, model selection on validation worst-group
accuracy where the column has it).

Slow (`make test-all`): the cells below are trained per seed in a shared fixture; with
`GROUP_TINY_LOGS=<log dir of a group_tiny run>` the finished runs there are reused (same config
fingerprint) and only missing ones are trained, so the assertions can be checked on exactly the runs
of the committed table (results/group_tiny/tiny.md).

Thresholds: the group-robustness issue's (GroupDRO over ERM by 20 / 5 points, ASGDRO no lower than
GroupDRO minus 1 and above it with a core feature masked) and spec §1.8's SCER criteria; the margins
measured are in README ("Group robustness in miniature") and the issue's closing note.
"""

from __future__ import annotations

import pytest
from _claims import seed_mean, table_runs

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)
WGA = "test/test/worst_group_acc"
MASKED = "test/test_masked/worst_group_acc"
COLUMNS = {
    "shapes_linear": ("erm", "groupdro", "asgdro"),
    "shapes_last": ("erm", "groupdro", "asgdro"),
    "synth": ("erm", "groupdro", "asgdro", "scer"),
    "linear_two_core": ("groupdro", "asgdro"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[tuple[str, int], dict[str, float]]]:
    fresh = tmp_path_factory.mktemp("group_tiny")
    return {
        col: table_runs(rows, col, SEEDS, "GROUP_TINY_LOGS", fresh) for col, rows in COLUMNS.items()
    }


@pytest.mark.parametrize(("col", "margin"), [("shapes_linear", 20.0), ("shapes_last", 5.0)])
def test_groupdro_beats_erm_on_group_shapes_at_every_seed(runs, col: str, margin: float) -> None:
    """GroupDRO's test WGA >= ERM's + 20 with a linear head on frozen features, + 5 when the last
    image stage trains too (every seed)."""
    r = runs[col]
    for s in SEEDS:
        assert r["groupdro", s][WGA] >= r["erm", s][WGA] + margin, (col, s)


@pytest.mark.parametrize("col", ["shapes_linear", "shapes_last", "synth"])
def test_asgdro_is_no_lower_than_groupdro_minus_1(runs, col: str) -> None:
    """ASGDRO's test WGA >= GroupDRO's - 1 (mean over seeds)."""
    r = runs[col]
    assert seed_mean(r, "asgdro", WGA, SEEDS) >= seed_mean(r, "groupdro", WGA, SEEDS) - 1.0


def test_asgdro_beats_groupdro_with_a_core_feature_masked(runs) -> None:
    """Spec §2.5: with core0 zeroed at test, ASGDRO's WGA > GroupDRO's at every seed (and >= 1
    point on the mean); with it present they tie near 100."""
    r = runs["linear_two_core"]
    for s in SEEDS:
        assert r["asgdro", s][MASKED] > r["groupdro", s][MASKED], s
    gain = seed_mean(r, "asgdro", MASKED, SEEDS) - seed_mean(r, "groupdro", MASKED, SEEDS)
    assert gain >= 1.0
    assert seed_mean(r, "asgdro", WGA, SEEDS) >= seed_mean(r, "groupdro", WGA, SEEDS) - 1.0


def test_scer_meets_the_synthetic_pass_criteria(runs) -> None:
    """Spec §1.8 at every seed: (i) SCER's |s| below ERM's at the end of training (the features'
    alignment with the spurious direction, on the balanced test set); (ii) SCER's test WGA >=
    GroupDRO's - 1 and >= ERM's + 10."""
    r = runs["synth"]
    for s in SEEDS:
        assert r["scer", s]["test/scer_abs_s"] < r["erm", s]["test/scer_abs_s"], s
        assert r["scer", s][WGA] >= r["groupdro", s][WGA] - 1.0, s
        assert r["scer", s][WGA] >= r["erm", s][WGA] + 10.0, s
