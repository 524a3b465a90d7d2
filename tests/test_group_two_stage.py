"""JTT and DFR (spec robustness_ood_prompting.md §1.7): JTT's error set and stage-2 weights against an
independent computation, both stages recorded by the runner and a killed run resuming in its stage;
DFR's balanced subsets, its head against scikit-learn's L1 logistic regression fitted directly, its
source-run checks, and DFR end to end on a small finished ERM run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from reprolab.data.vector_groups import VectorGroupDataModule
from reprolab.methods.finetuning.source import SourceRunError
from reprolab.methods.group.dfr import DFR, balanced_indices, fit_averaged, linear_head
from reprolab.methods.group.jtt import JTT, ordered_batches, stage2_weights, train_split
from reprolab.models.mlp import MLPFeaturizer

SMALL_DATA = [  # a smaller group_synth (same proportions): each run takes a second or two
    "data.dataset_kwargs.n_train=1000",
    "data.dataset_kwargs.n_val=400",
    "data.dataset_kwargs.n_test=1000",
]
BASE = ["model=mlp_featurizer", "logger=csv", "progress_bar=false", "threads=1"]


def _cfg(tmp: Path, *overrides: str, data: str = "group_synth"):
    from reprolab.utils.config import compose_train

    return compose_train([*BASE, f"data={data}", *SMALL_DATA, f"paths.log_dir={tmp}", *overrides])


def _run(tmp: Path, *overrides: str, data: str = "group_synth") -> dict:
    from reprolab.train import run

    return run(_cfg(tmp, *overrides, data=data))


def _sk_l1(c: float) -> LogisticRegression:
    """The official `LogisticRegression(penalty="l1", C=c, solver="liblinear")`, seeded."""
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=c, solver="liblinear", random_state=0, **l1)


# ------------------------------------------------------------------------------------------------
# JTT


def _jtt(n_train: int = 150, lam: float = 7.0) -> tuple[JTT, VectorGroupDataModule]:
    torch.manual_seed(0)
    dm = VectorGroupDataModule(
        name="group_synth",
        dataset="group_synth",
        dataset_kwargs={"n_train": n_train, "n_val": 40, "n_test": 40},
        batch_size=16,
    )
    model = MLPFeaturizer(name="mlp_featurizer")
    method = JTT(name="jtt", model=model, info=dm.info, jtt_lambda=lam, total_steps=10)
    dm.configure(**method.data_requirements())
    dm.setup("fit")
    method.setup("fit")
    return method, dm


def test_error_set_is_the_misclassified_indices_and_stage2_weights_are_lambda_on_it() -> None:
    method, dm = _jtt()
    with torch.no_grad():  # a head that makes a fair share of mistakes
        method.head.weight.normal_(generator=torch.Generator().manual_seed(3))
    errors = method.identify_errors(train_split(dm), batch_size=7)  # batches cut across the rows
    rows = dm.data.splits["train"]
    with torch.no_grad():
        pred = method.head(method.backbone(rows["image"])).argmax(-1)
    expected = rows["index"][pred != rows["label"]].tolist()
    assert 0 < len(expected) < len(pred)
    assert errors == sorted(expected) == method.error_set
    assert method.num_train == len(pred)
    g = rows["group"][pred != rows["label"]]
    assert method.error_set_groups == torch.bincount(g, minlength=4).tolist()

    w = stage2_weights(errors, len(pred), 7.0)
    mask = torch.zeros(len(pred), dtype=torch.bool)
    mask[expected] = True
    assert torch.equal(w[mask], torch.full((int(mask.sum()),), 7.0))
    assert torch.equal(w[~mask], torch.ones(int((~mask).sum())))

    # stage 2's loss: the batch mean of λ·CE on the error set and CE elsewhere, keyed by `index`
    method.start_round(1, dm)
    assert torch.equal(method.upweights, w)
    method.log = lambda *a, **k: None  # no trainer here
    batch = next(iter(dm.train_dataloader()))
    loss = method.training_step(batch, 0)
    with torch.no_grad():
        ce = F.cross_entropy(method.logits(batch["image"]), batch["label"], reduction="none")
    ref = (ce * w[batch["index"]]).mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)
    method.start_round(0, dm)  # stage 1 is plain ERM
    assert float(method.training_step(batch, 0).detach()) == pytest.approx(
        float(ce.mean()), rel=1e-6
    )


class _Items(torch.utils.data.Dataset):
    """An item dataset as `ClassificationDataModule` serves (one dict per item, with `index`)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((2,), float(i)), "label": i % 2, "index": i}


def test_ordered_batches_serve_every_item_once_in_order() -> None:
    batches = list(ordered_batches(_Items(), 4))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    method, dm = _jtt(n_train=23)
    rows = list(ordered_batches(train_split(dm), 5))  # vector rows: sliced
    assert torch.cat([b["index"] for b in rows]).tolist() == list(range(23))


def test_stage_budgets_split_the_run_as_subpopbench() -> None:
    method, _ = _jtt()
    assert method.stage_budgets == [{"max_steps": 5}, {"max_steps": 5}]
    m = JTT(name="jtt", model=MLPFeaturizer(name="mlp"), info=method.info, total_steps=5001)
    assert [m.round_trainer_overrides(r) for r in (0, 1)] == [
        {"max_steps": 2500},
        {"max_steps": 2501},
    ]
    m = JTT(
        name="jtt",
        model=MLPFeaturizer(name="mlp"),
        info=method.info,
        total_epochs=10,
        first_stage_step_frac=0.3,
    )
    assert m.stage_budgets == [{"max_epochs": 3}, {"max_epochs": 7}]
    from reprolab.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="trainer.max_steps"):
        JTT(name="jtt", model=MLPFeaturizer(name="mlp"), info=method.info)


JTT_RUN = [
    "method=jtt",
    "+trainer.max_steps=24",
    "trainer.max_epochs=-1",
    "method.optimizer.lr=0.05",
]


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_jtt_end_to_end_records_both_stages_and_restarts_from_the_initial_weights(
    tmp_path: Path, monkeypatch
) -> None:
    seen: dict[str, dict] = {}
    original = JTT.on_fit_start

    def spy(self):
        if self.stage == "upweight":
            seen["end_of_stage1"] = _params(self.backbone)
        original(self)
        if self.stage == "upweight":
            seen["start_of_stage2"] = _params(self.backbone)
            seen["initial"] = self._initial_backbone

    monkeypatch.setattr(JTT, "on_fit_start", spy)
    record = _run(tmp_path, *JTT_RUN)
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert [r["state"]["stage"] for r in rounds] == ["identify", "upweight"]
    state = rounds[0]["state"]
    assert state["num_train"] == 1000 and state["error_set_size"] == len(state["error_set"])
    assert state["error_set"] == sorted(set(state["error_set"])) and 0 < len(state["error_set"])
    assert sum(state["error_set_groups"]) == state["error_set_size"]
    m = record["metrics"]
    assert m["jtt/error_set_size"] == state["error_set_size"]
    assert m["jtt/error_set_frac"] == pytest.approx(100.0 * state["error_set_size"] / 1000)
    for r in rounds:  # each stage's test metrics
        assert "test/test/worst_group_acc" in r["metrics"]
    assert record["global_step"] == 12  # stage 2 trains the other half of the 24 steps
    for k, v in seen["initial"].items():  # stage 2 starts again from the initial featurizer
        assert torch.equal(seen["start_of_stage2"][k], v)
    assert any(not torch.equal(seen["end_of_stage1"][k], v) for k, v in seen["initial"].items())


def test_a_killed_jtt_run_resumes_in_its_stage(tmp_path: Path, monkeypatch) -> None:
    """Killed at the start of stage 2, then inside it: the error set is not recomputed, stage 2
    starts from the initial weights, and resumes from its own checkpoint (not stage 1's)."""
    calls: list[str] = []
    identify = JTT.identify_errors

    def counting(self, *a, **k):
        calls.append("identify")
        return identify(self, *a, **k)

    monkeypatch.setattr(JTT, "identify_errors", counting)
    original_start = JTT.start_round

    def die_at_stage2(self, r, dm):
        if r == 1:
            raise RuntimeError("killed at the start of stage 2")
        original_start(self, r, dm)

    monkeypatch.setattr(JTT, "start_round", die_at_stage2)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, *JTT_RUN)
    run_dir = Path(_cfg(tmp_path, *JTT_RUN).paths.run_dir)
    first = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in first] == [0] and calls == ["identify"]

    # stage 2 dies after its first epoch (9 batches of 108: a checkpoint at step 9)
    monkeypatch.setattr(JTT, "start_round", original_start)
    original_step = JTT.training_step
    seen: dict[str, dict] = {}

    def die_in_stage2(self, batch, i):
        if self.stage == "upweight" and self.trainer.global_step == 10:
            seen["at_kill"] = _params(self.backbone)
            raise RuntimeError("killed inside stage 2")
        return original_step(self, batch, i)

    monkeypatch.setattr(JTT, "training_step", die_in_stage2)
    with pytest.raises(RuntimeError, match="killed inside"):
        _run(tmp_path, *JTT_RUN)
    ckpt = torch.load(run_dir / "checkpoints/round1/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9

    monkeypatch.setattr(JTT, "training_step", original_step)
    original_fit_start = JTT.on_fit_start

    def spy(self):
        original_fit_start(self)
        seen["resumed"] = _params(self.backbone)

    monkeypatch.setattr(JTT, "on_fit_start", spy)
    record = _run(tmp_path, *JTT_RUN)
    assert calls == ["identify"]  # the stage-1 error set came from rounds.json
    assert record["rounds"][0]["state"]["error_set"] == first[0]["state"]["error_set"]
    for k, v in seen["resumed"].items():  # stage 2's own weights at step 9, not stage 1's
        assert torch.equal(v, ckpt["state_dict"][f"backbone.{k}"])
    assert record["global_step"] == 12


# ------------------------------------------------------------------------------------------------
# DFR: the pieces


def test_balanced_subsets_have_equal_group_counts() -> None:
    g = np.repeat([0, 1, 2, 3], [50, 7, 12, 31])
    rng = np.random.default_rng(0)
    subsets = [balanced_indices(g, rng) for _ in range(3)]
    for idx in subsets:
        assert np.bincount(g[idx]).tolist() == [7, 7, 7, 7]
        assert len(set(idx.tolist())) == len(idx)  # without replacement
    assert not np.array_equal(np.sort(subsets[0]), np.sort(subsets[1]))  # fresh draws
    # a group absent from the split is left out, not a reason for an empty subset
    g = np.array([0, 0, 0, 2, 2])
    assert np.bincount(g[balanced_indices(g, rng)]).tolist() == [2, 0, 2]


def _toy(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = rng.choice(4, size=n, p=[0.45, 0.05, 0.1, 0.4])
    y = g // 2
    x = rng.normal(size=(n, 6)) + np.outer(2 * y - 1, [1.0, 0.5, 0, 0, 0, 0])
    x[:, 2] += 2 * (g % 2) - 1  # a spurious coordinate
    return x * np.array([1, 2, 3, 0.5, 1, 4]) + 0.7, y, g


@pytest.mark.parametrize("retrains", [1, 3])
def test_dfr_head_is_sklearns_l1_logistic_regression_on_the_same_subsets(retrains: int) -> None:
    x, y, g = _toy()
    x_train = _toy(seed=1)[0]  # the official head standardises with the train split's statistics
    scaler = StandardScaler().fit(x_train)
    c = 0.3
    coef, intercept, n = fit_averaged(
        x, y, g, c, 2, np.random.default_rng(5), scaler.mean_, scaler.scale_, retrains
    )
    w, b = linear_head(coef, intercept, scaler.mean_, scaler.scale_, 2)
    x_test = _toy(seed=2)[0]
    logits = torch.as_tensor(x_test, dtype=torch.float32) @ w.T + b  # (N, 2) on raw features

    rng = np.random.default_rng(5)
    fits = []
    for _ in range(retrains):
        idx = balanced_indices(g, rng)
        fits.append(_sk_l1(c).fit(scaler.transform(x[idx]), y[idx]))
    assert n == len(idx) == 4 * np.bincount(g).min()
    ref = fits[0]
    ref.coef_ = np.mean([f.coef_ for f in fits], axis=0)
    ref.intercept_ = np.mean([f.intercept_ for f in fits], axis=0)
    z = ref.decision_function(scaler.transform(x_test))
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), z, atol=1e-4)
    np.testing.assert_allclose(
        logits.softmax(-1).numpy(), ref.predict_proba(scaler.transform(x_test)), atol=1e-5
    )
    assert np.count_nonzero(ref.coef_) < x.shape[1] or c >= 1  # L1: some weights are zero


# ------------------------------------------------------------------------------------------------
# DFR on a finished ERM run


@pytest.fixture(scope="module")
def erm_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("erm")
    overrides = [
        "method=erm",
        "+trainer.max_steps=60",
        "trainer.max_epochs=-1",
        "method.optimizer.lr=0.05",
    ]
    record = _run(tmp, *overrides)
    return {"record": record, "run_dir": str(_cfg(tmp, *overrides).paths.run_dir)}


def _dfr(run_dir: str | Path, *extra: str) -> list[str]:
    source = [f"method.source.run_dir={run_dir}", "method.source.experiment=erm_group_synth"]
    return ["method=dfr", *source, *extra]


def test_dfr_end_to_end_on_a_finished_erm_run(erm_run: dict, tmp_path: Path) -> None:
    record = _run(tmp_path, *_dfr(erm_run["run_dir"]))
    m = record["metrics"]
    assert m["dfr/C"] in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
    val_groups = VectorGroupDataModule(
        name="group_synth",
        dataset="group_synth",
        dataset_kwargs={"n_train": 1000, "n_val": 400, "n_test": 1000},
    ).data.splits["val"]["group"]
    assert m["dfr/balanced_examples"] == 4 * int(torch.bincount(val_groups).min())
    assert m["dfr/val_examples"] == 400
    assert m["params/trainable"] == 2 * 16 + 2  # the head; the featurizer is frozen
    assert record["global_step"] == 0  # post-hoc: nothing trained by the runner
    erm = erm_run["record"]["metrics"]
    wga, erm_wga = m["test/test/worst_group_acc"], erm["test/test/worst_group_acc"]
    assert wga > erm_wga, (wga, erm_wga)  # seed 1: ERM 65.6, DFR 79.6


def test_dfr_head_equals_sklearn_on_the_erm_features(erm_run: dict, tmp_path: Path) -> None:
    """The method's head = sklearn fitted directly on the ERM featurizer's val features (same C)."""
    import hydra

    one_fit = ["method.c_options=[0.07]", "method.num_retrains=1"]
    cfg = _cfg(tmp_path, *_dfr(erm_run["run_dir"], *one_fit))
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")(model=model, info=dm.info)
    dm.configure(**method.data_requirements())
    dm.setup("test")
    method.setup("test")
    ckpt = torch.load(Path(erm_run["run_dir"]) / "checkpoints/last.ckpt", weights_only=False)
    for k, v in method.backbone.state_dict().items():  # the ERM run's featurizer
        assert torch.equal(v, ckpt["state_dict"][f"backbone.{k}"])
    record = method.fit_last_layer(dm)
    assert record["dfr/C"] == 0.07

    rows = dm.data.splits
    with torch.no_grad():
        f_val = model(rows["val"]["image"]).double().numpy()
        f_train = model(rows["train"]["image"]).double().numpy()
        f_test = model(rows["test"]["image"]).double().numpy()
    g, y = rows["val"]["group"].numpy(), rows["val"]["label"].numpy()
    idx = balanced_indices(g, np.random.default_rng(cfg.method.subset_seed))
    scaler = StandardScaler().fit(f_train)
    ref = _sk_l1(0.07).fit(scaler.transform(f_val[idx]), y[idx])
    with torch.no_grad():
        logits = method.head(torch.as_tensor(f_test, dtype=torch.float32))
    z = ref.decision_function(scaler.transform(f_test))
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), z, atol=1e-4)


def test_dfr_on_a_missing_or_foreign_erm_run_fails_before_any_work(
    erm_run: dict, tmp_path: Path, monkeypatch
) -> None:
    def no_work(self, dm):
        raise AssertionError("DFR started fitting")

    monkeypatch.setattr(DFR, "fit_last_layer", no_work)
    missing = tmp_path / "logs" / "dev.none.erm.group_synth" / "seed3"
    cases = {  # missing; a dir without a finished record
        missing: "experiment=erm_group_synth seed=3",
        tmp_path: "experiment=erm_group_synth",
    }
    for i, (run_dir, command) in enumerate(cases.items()):
        with pytest.raises(SourceRunError) as err:
            _run(tmp_path / f"dfr{i}", *_dfr(run_dir))
        msg = str(err.value)
        assert "\n" not in msg and "method=dfr" in msg and f"python train.py {command}" in msg
    foreign = "trained on data=group_synth, not data=group_synth_two_core"
    with pytest.raises(SourceRunError, match=foreign):
        _run(tmp_path / "dfr2", *_dfr(erm_run["run_dir"]), data="group_synth_two_core")
    assert not list(tmp_path.glob("dfr*/**/metrics.json"))
    assert len(list(tmp_path.glob("dfr*/**/failed.json"))) == 3  # each failure is recorded
