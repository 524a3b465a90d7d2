"""Every method runs end to end on the tiny random CLIP; black-box methods keep their contract."""

from pathlib import Path

import pytest
import torch

from reprolab.train import run
from reprolab.utils.config import compose_train

TINY_COORDINATOR = ["method.coordinator.encoder=tiny", "method.coordinator.pretrained=false"]
METHODS = {
    "zeroshot": [],
    "linear_probe": [],
    "vp": [],
    "vp_spsa": [],
    "bar": [],
    "blackvip": TINY_COORDINATOR,
    "coop": [],
    "kgcoop": [],
    "cocoop": [],
    "cdesc": [],
    "dclip": [],
    "eplkg": [],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_fast_dev_run(method: str, tiny_overrides: list[str]) -> None:
    cfg = compose_train(
        [*tiny_overrides, f"method={method}", "debug=fdr", "data.num_shots=4", *METHODS[method]]
    )
    record = run(cfg)
    assert 0.0 <= record["metrics"]["test/acc"] <= 100.0
    assert "test/test_clutter/acc" in record["metrics"]
    if method in ("vp_spsa", "bar", "blackvip"):
        per_step = {"vp_spsa": 10, "blackvip": 10, "bar": 6}[method]
        assert record["metrics"]["train/queries_per_step"] == per_step
        assert record["metrics"]["train/queries"] == per_step  # fast_dev_run: one step


def _coordinator_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return {
        k: v for k, v in ckpt["state_dict"].items() if k.startswith("coordinator.decoder")
    }, ckpt


def test_blackvip_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """A run killed after epoch 1 and relaunched ends with the same weights, SPSA state and query
    count as a run that was never interrupted (perturbation RNG, momentum and BN stats restored)."""
    common = [
        "model=tiny_clip_random",
        "data=shapes",
        "method=blackvip",
        "logger=csv",
        "progress_bar=false",
        "data.num_shots=4",
        "data.batch_size=20",
        *TINY_COORDINATOR,
        "method.batched=false",
    ]
    straight = compose_train([*common, f"paths.log_dir={tmp_path / 'a'}", "trainer.max_epochs=2"])
    rec_a = run(straight)
    first = compose_train([*common, f"paths.log_dir={tmp_path / 'b'}", "trainer.max_epochs=1"])
    run(first)
    resumed = compose_train(
        [*common, f"paths.log_dir={tmp_path / 'b'}", "trainer.max_epochs=2", "skip_if_done=false"]
    )
    rec_b = run(resumed)
    sa, ca = _coordinator_state(Path(straight.paths.run_dir))
    sb, cb = _coordinator_state(Path(resumed.paths.run_dir))
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert ca["zo_optimizer"]["k"] == cb["zo_optimizer"]["k"] == rec_a["global_step"]
    assert torch.equal(ca["zo_optimizer"]["m"], cb["zo_optimizer"]["m"])
    assert rec_a["metrics"]["train/queries"] == rec_b["metrics"]["train/queries"]
    assert rec_a["metrics"]["test/acc"] == rec_b["metrics"]["test/acc"]
    assert not any(k.startswith("backbone.") for k in ca["state_dict"])  # the target never saved


def test_query_budget_stops_training_cleanly(tiny_overrides: list[str]) -> None:
    cfg = compose_train(
        [
            *tiny_overrides,
            "method=vp_spsa",
            "data.num_shots=8",
            "data.batch_size=16",
            "trainer.max_epochs=50",
            "method.budget=500",
        ]
    )
    record = run(cfg)
    # 10 queries x 16 images = 160 images per step: 3 steps fit in 500, the 4th would not.
    assert record["metrics"]["train/images"] == 480
    assert record["global_step"] == 3
    assert "test/acc" in record["metrics"]


def test_white_box_vp_lr_schedule_matches_the_official_one() -> None:
    """Epoch 0 at warmup_min_lr, linear warmup lr*e/W, then Dassl's cosine with T_max = max_epoch
    restarted at W (WARMUP_RECOUNT), checked against torch's CosineAnnealingLR stepped from W."""
    from reprolab.methods.prompting.vp import vp_lr_factor

    def lr_at(e: int) -> float:
        return 40.0 * vp_lr_factor(e, lr=40.0, warmup=100, warmup_min_lr=0.1, total=1000)

    assert lr_at(0) == pytest.approx(0.1)
    assert lr_at(50) == pytest.approx(20.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=40.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for e in range(100, 1000):
        assert lr_at(e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), e
        opt.step()
        cosine.step()
    assert lr_at(999) == pytest.approx(40.0 * 0.0248, rel=0.01)  # 2.5% of lr, not 0
