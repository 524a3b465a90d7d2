"""SubpopBench's single-stage baselines (resample, reweight, mixup, lisa, irm, coral) against
independent computations: NumPy cross-entropies, weights, means and covariances, IRMv1's penalty in
closed form, and the LISA pairing rule; then each one end to end through the runner (spec
robustness_ood_prompting.md §1.7)."""

from __future__ import annotations

import copy
import csv
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from _group_helpers import BatchData, CountedBatchData, Featurizer, fit_batches, toy_info

from reprolab.data.info import TaskInfoError
from reprolab.errors import ConfigValueError
from reprolab.methods.group.coral import CORAL, coral_distance, coral_penalty
from reprolab.methods.group.irm import IRM, batch_attributes, irm_penalty, irm_terms
from reprolab.methods.group.lisa import LISA, cutmix_pairs, lisa_batch, lisa_pairs, mixup_pairs
from reprolab.methods.group.mixup import Mixup, mix_inputs, mixup_loss
from reprolab.methods.group.resample import ReSample
from reprolab.methods.group.reweight import ReWeight, inverse_size_weights

SGD = functools.partial(torch.optim.SGD, lr=0.0)


# ------------------------------------------------------------------------------------------------
# helpers


def _np_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy. (B,)"""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def _np_irm_grad(logits: np.ndarray, labels: np.ndarray) -> float:
    """d/ds mean CE(s · z, y) at s = 1 = mean_n (Σ_c softmax(z_n)_c z_nc − z_{n,y_n})."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return float(np.mean((p * logits).sum(1) - logits[np.arange(len(labels)), labels]))


def _batch(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Labels and attributes with every group present; g = 2y + a."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 1] * (n // 2))
    a = torch.tensor([0, 0, 1, 1] * (n // 4))
    perm = torch.randperm(n, generator=g)
    y, a = y[perm], a[perm]
    return {"image": torch.randn(n, 3, generator=g), "label": y, "group": 2 * y + a}


def _build(cls, **kw):
    torch.manual_seed(0)
    m = cls(name=cls.__name__.lower(), model=Featurizer(), info=toy_info(4), optimizer=SGD, **kw)
    m.head = m.build_head("random")
    return m


def _fit_one(method, batches: list[dict], counts: list[float] | None = None) -> dict:
    """Fit on `batches` (lr 0: the weights stay); the values logged at the last step."""
    dm = BatchData(batches) if counts is None else CountedBatchData(batches, counts)
    trainer = fit_batches(method, dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _initial(method, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of `batch` under an untouched copy of the method."""
    m = copy.deepcopy(method)
    with torch.no_grad():
        h = m.image_features(batch["image"])
        return h.double().numpy(), m.head(h).double().numpy()


# ------------------------------------------------------------------------------------------------
# reweight


def test_reweight_weights_and_loss_match_a_hand_computation() -> None:
    counts = [40.0, 10.0, 0.0, 50.0]
    inv = np.array([1 / 40, 1 / 10, 0.0, 1 / 50])  # upstream: 1 / inf = 0 for an empty group
    ref_w = inv / inv.sum() * 4
    np.testing.assert_allclose(inverse_size_weights(torch.tensor(counts)).numpy(), ref_w)

    batch = _batch()
    batch["group"] = torch.where(batch["group"] == 2, torch.tensor(3), batch["group"])
    batch["label"] = batch["group"] // 2
    m = _build(ReWeight)
    _, logits = _initial(m, batch)
    logged = _fit_one(m, [batch], counts)  # the counts come from the data module at setup
    ce = _np_ce(logits, batch["label"].numpy())
    expected = np.mean(ref_w[batch["group"].numpy()] * ce)
    assert logged["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["train/ce"] == pytest.approx(ce.mean(), rel=1e-5)

    with pytest.raises(ConfigValueError, match=r"train group counts") as e:
        _fit_one(_build(ReWeight), [batch], None)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# resample


def test_resample_requires_the_group_balanced_sampler_in_one_line() -> None:
    m = _build(ReSample)
    dm = BatchData([_batch()])
    for sampler in (None, "class_balanced"):
        dm.sampler = sampler
        with pytest.raises(ConfigValueError, match=r"data\.sampler=group_balanced") as e:
            m.check_sampler(dm)
        assert "\n" not in str(e.value) and "data=toy" in str(e.value)
    dm.sampler = "group_balanced"
    m.check_sampler(dm)
    with pytest.raises(ConfigValueError, match=r"data\.sampler=group_balanced"):
        _fit_one(_build(ReSample), [_batch()])  # checked when the fit starts


# ------------------------------------------------------------------------------------------------
# mixup


def test_mixup_inputs_and_loss_match_a_hand_computation() -> None:
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0, 1])
    perm, lam = torch.tensor([2, 0, 4, 1, 3]), 0.3
    xn = x.numpy()
    np.testing.assert_allclose(
        mix_inputs(x, lam, perm).numpy(), lam * xn + (1 - lam) * xn[perm.numpy()], rtol=1e-6
    )
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ln = logits.numpy()
    expected = lam * _np_ce(ln, y.numpy()).mean() + (1 - lam) * _np_ce(ln, y.numpy()[perm]).mean()
    assert float(mixup_loss(logits, y, lam, perm)) == pytest.approx(expected, rel=1e-12)


def test_mixup_step_uses_one_beta_lambda_per_batch(monkeypatch) -> None:
    assert _build(Mixup, alpha=0.0).sample_lambda() == 1.0  # α = 0: no mixing (upstream)
    m = _build(Mixup, alpha=0.2)
    lams = [m.sample_lambda() for _ in range(300)]
    assert 0.0 <= min(lams) and max(lams) <= 1.0 and np.mean(lams) == pytest.approx(0.5, abs=0.08)
    assert np.mean([min(v, 1 - v) < 0.05 for v in lams]) > 0.4  # Beta(0.2, 0.2): U-shaped

    batch = _batch()
    _, logits0 = _initial(m, batch)
    monkeypatch.setattr(Mixup, "sample_lambda", lambda self: 1.0)  # λ = 1: plain CE
    logged = _fit_one(m, [batch])
    assert logged["train/mixup_lambda"] == 1.0
    assert logged["train/loss"] == pytest.approx(_np_ce(logits0, batch["label"].numpy()).mean())


# ------------------------------------------------------------------------------------------------
# LISA


@pytest.mark.parametrize("intra_label", [True, False])
def test_lisa_pairs_follow_the_same_label_or_same_attribute_rule(intra_label: bool) -> None:
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    a = torch.tensor([0, 1, 1, 2, 0, 0, 0, 1, 2, 2, 2, 2])  # class 2 has one attribute value
    pairs = lisa_pairs(y, a, intra_label, num_classes=3)
    assert pairs
    for i, j in pairs:
        assert len(i) == len(j) > 0
        if intra_label:
            assert torch.equal(y[i], y[j]) and (a[i] != a[j]).all()
            assert len(torch.unique(y[i])) == 1 and len(torch.unique(a[i])) == 1
        else:
            assert torch.equal(a[i], a[j]) and (y[i] != y[j]).all()
            assert len(torch.unique(a[i])) == 1 and len(torch.unique(y[i])) == 1
        # k = the smaller of the two subsets, each in batch order (upstream's first-k pairing)
        sub_i = torch.nonzero((y == y[i[0]]) & (a == a[i[0]])).flatten()
        sub_j = torch.nonzero((y == y[j[0]]) & (a == a[j[0]])).flatten()
        assert len(i) == min(len(sub_i), len(sub_j))
        assert torch.equal(i, sub_i[: len(i)]) and torch.equal(j, sub_j[: len(j)])
    keys = [int((y if intra_label else a)[i[0]]) for i, _ in pairs]
    # intra-label: class 2 has one attribute value, no pair; intra-attribute: a = 2 has y 0 and 2
    assert keys == ([0, 1] if intra_label else [0, 1, 2])
    # nothing to pair: one attribute (intra-label) or one label (intra-attribute) in the batch
    assert lisa_pairs(y, torch.zeros_like(y), True, 3) == []
    assert lisa_pairs(torch.zeros_like(a), a, False, 3) == []


@pytest.mark.parametrize("intra_label", [True, False])
def test_lisa_batch_with_a_fixed_lambda_is_a_mix_of_valid_pairs(intra_label: bool) -> None:
    torch.manual_seed(1)
    batch = _batch(16, seed=3)
    x, y, a = batch["image"], batch["label"], batch["group"] % 2
    lam = 0.3
    mx, my, mixed = lisa_batch(x, y, a, 2, intra_label, 2.0, lam_fn=lambda k: torch.full((k,), lam))
    assert mixed and mx.shape == x.shape and my.shape == (16, 2)
    onehot = np.eye(2)[y.numpy()]
    candidates = []
    for i, j in itertools.product(range(16), repeat=2):
        ok = (y[i] == y[j] and a[i] != a[j]) if intra_label else (a[i] == a[j] and y[i] != y[j])
        if ok:
            candidates.append(
                (
                    lam * x[i].numpy() + (1 - lam) * x[j].numpy(),
                    lam * onehot[i] + (1 - lam) * onehot[j],
                )
            )
    for row_x, row_y in zip(mx.numpy(), my.numpy(), strict=True):
        assert any(
            np.allclose(row_x, cx, atol=1e-6) and np.allclose(row_y, cy, atol=1e-6)
            for cx, cy in candidates
        )
    # a batch with a single attribute value: intra-label LISA leaves it unmixed
    same, sy, mixed = lisa_batch(x, y, torch.zeros_like(a), 2, True, 2.0)
    assert not mixed and torch.equal(same, x) and torch.equal(sy, torch.eye(2)[y])


def test_lisa_mixup_and_cutmix_pairs_match_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    y1, y2 = torch.eye(3)[[0, 1]], torch.eye(3)[[2, 2]]
    lam = torch.tensor([0.25, 0.9])
    mx, my = mixup_pairs(x1, x2, y1, y2, lam)
    for n in range(2):
        l_n = float(lam[n])
        np.testing.assert_allclose(
            mx[n].numpy(), l_n * x1[n].numpy() + (1 - l_n) * x2[n].numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(my[n].numpy(), l_n * y1[n].numpy() + (1 - l_n) * y2[n].numpy())

    cx, cy = cutmix_pairs(x1.clone(), x2.clone(), y1, y2, box=(1, 2, 3, 5))  # dims 2: 1..3, 3: 2..5
    ref = np.concatenate([x1.numpy(), x2.numpy()])
    partner = np.concatenate([ref[2:], ref[:2]])
    ref[:, :, 1:3, 2:5] = partner[:, :, 1:3, 2:5]
    np.testing.assert_array_equal(cx.numpy(), ref)
    kept = 1 - (2 * 3) / (4 * 5)
    t = np.concatenate([y1.numpy(), y2.numpy()])
    np.testing.assert_allclose(cy.numpy(), kept * t + (1 - kept) * np.concatenate([t[2:], t[:2]]))


def test_lisa_cutmix_batch_pastes_boxes_between_valid_pairs() -> None:
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    a = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0])
    x = torch.randn(8, 3, 6, 6, generator=g)
    mx, my, mixed = lisa_batch(
        x, y, a, 2, False, 2.0, "cutmix", lam_fn=lambda k: torch.full((k,), 0.5)
    )
    assert mixed and mx.shape == x.shape
    np.testing.assert_allclose(my.sum(1).numpy(), 1.0, rtol=1e-6)
    for img, target in zip(mx, my, strict=True):
        # each output is image i with a box from a partner j of the same attribute, other label
        found = False
        for i, j in itertools.permutations(range(8), 2):
            if a[i] != a[j] or y[i] == y[j]:
                continue
            from_i, from_j = img == x[i], img == x[j]
            if (from_i | from_j).all() and from_i.any():
                kept = float(from_i[0].float().mean())  # the box spans all channels
                ref = kept * torch.eye(2)[y[i]] + (1 - kept) * torch.eye(2)[y[j]]
                found = found or torch.allclose(target, ref, atol=1e-6)
        assert found


def test_lisa_step_loss_is_soft_target_cross_entropy(monkeypatch) -> None:
    m = _build(LISA, p_sel=1.0)
    batch = _batch()
    _, logits0 = _initial(m, batch)
    monkeypatch.setattr(  # no attribute pairs anywhere: the batch stays unmixed, CE on one-hot
        "reprolab.methods.group.lisa.lisa_pairs", lambda *a, **k: []
    )
    logged = _fit_one(m, [batch])
    assert logged["train/lisa_mixed"] == 0.0 and logged["train/lisa_intra_label"] == 1.0
    assert logged["train/loss"] == pytest.approx(_np_ce(logits0, batch["label"].numpy()).mean())


# ------------------------------------------------------------------------------------------------
# text: token-id inputs are mixed after the featurizer


class _TokenFeaturizer(torch.nn.Module):
    """Token ids (B, L, 3) -> the mean embedding of the ids (B, 4); rejects float inputs, as BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.trainable, self.feature_dim, self.preprocess = "tok", "image", 4, None
        self.emb = torch.nn.Embedding(20, 4)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        assert not x.is_floating_point(), "token ids must reach the featurizer unmixed"
        return self.emb(x[..., 0]).mean(1)


def _token_batch(n: int = 12) -> dict[str, torch.Tensor]:
    batch = _batch(n)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (n, 5), generator=g)
    batch["image"] = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], -1)
    return batch


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("cls", [Mixup, LISA])
def test_mixup_and_lisa_mix_the_featurizer_output_of_token_inputs(cls, monkeypatch) -> None:
    torch.manual_seed(0)
    m = cls(
        name=cls.__name__.lower(),
        model=_TokenFeaturizer(),
        info=toy_info(4),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    m.head = m.build_head("random")
    batch = _token_batch()
    with torch.no_grad():
        h = m.image_features(batch["image"])
        logits0 = m.head(h)
    if cls is Mixup:  # loss = λ CE(head(λ h + (1-λ) h_π), y) + (1-λ) CE(., y_π)
        monkeypatch.setattr(Mixup, "sample_lambda", lambda self: 0.3)
        torch.manual_seed(7)
        perm = torch.randperm(len(batch["label"]))
        with torch.no_grad():
            mixed = m.head(0.3 * h + 0.7 * h[perm]).double().numpy()
        y = batch["label"].numpy()
        want = 0.3 * _np_ce(mixed, y).mean() + 0.7 * _np_ce(mixed, y[perm.numpy()]).mean()
        torch.manual_seed(7)
    else:  # no pairs: the unmixed features, CE on one-hot targets
        monkeypatch.setattr("reprolab.methods.group.lisa.lisa_pairs", lambda *a, **k: [])
        want = _np_ce(logits0.double().numpy(), batch["label"].numpy()).mean()
    emb0 = m.backbone.emb.weight.detach().clone()
    loss = float(m.training_step(batch, 0).detach()) if cls is Mixup else None
    if cls is Mixup:
        assert loss == pytest.approx(want, rel=1e-5)
    logged = _fit_one(m, [batch])
    if cls is LISA:
        assert logged["train/loss"] == pytest.approx(want, rel=1e-5)
    assert not torch.equal(m.backbone.emb.weight, emb0)  # the featurizer trains through the mix


# ------------------------------------------------------------------------------------------------
# IRM


def test_irm_penalty_is_the_product_of_the_half_batch_scale_gradients() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    ln, yn = logits.detach().numpy(), y.numpy()
    expected = _np_irm_grad(ln[::2], yn[::2]) * _np_irm_grad(ln[1::2], yn[1::2])
    p = irm_penalty(logits, y)
    assert float(p.detach()) == pytest.approx(expected, rel=1e-10)
    p.backward()  # create_graph: the penalty trains the logits

    def closed_form(z: torch.Tensor) -> torch.Tensor:
        def grad(zz, yy):
            return ((zz.softmax(1) * zz).sum(1) - zz[torch.arange(len(yy)), yy]).mean()

        return grad(z[::2], y[::2]) * grad(z[1::2], y[1::2])

    ref = torch.autograd.grad(closed_form(logits), logits)[0]
    torch.testing.assert_close(logits.grad, ref)
    assert float(irm_penalty(logits[:1], y[:1])) == 0.0  # one sample: 0, not upstream's NaN


def test_irm_terms_average_over_environments_and_the_weight_anneals() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    envs = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    nll, pen = irm_terms(logits, y, envs)
    ln, yn, en = logits.numpy(), y.numpy(), envs.numpy()
    nll_ref, pen_ref = [], []
    for e in (0, 1):
        z, t = ln[en == e], yn[en == e]
        nll_ref.append(_np_ce(z, t).mean())
        pen_ref.append(_np_irm_grad(z[::2], t[::2]) * _np_irm_grad(z[1::2], t[1::2]))
    assert float(nll) == pytest.approx(np.mean(nll_ref), rel=1e-10)
    assert float(pen) == pytest.approx(np.mean(pen_ref), rel=1e-10)

    m = _build(IRM, irm_lambda=50.0, anneal_iters=2)
    batch = _batch()
    logged = _fit_one(m, [batch, batch, batch])
    assert int(m.update_count) == 3 and "update_count" in m.state_dict()
    assert logged["train/irm_weight"] == 50.0  # step index 2 >= anneal_iters
    assert m.penalty_weight() == 50.0 and _build(IRM, anneal_iters=2).penalty_weight() == 1.0
    _, logits0 = _initial(m, batch)  # lr 0: the weights did not move
    a = (batch["group"] % 2).numpy()
    ce = [_np_ce(logits0[a == e], batch["label"].numpy()[a == e]).mean() for e in (0, 1)]
    assert logged["train/nll"] == pytest.approx(np.mean(ce), rel=1e-5)  # environments = a


def test_batch_attributes_checks_the_group_layout() -> None:
    y = torch.tensor([0, 1, 1])
    assert torch.equal(
        batch_attributes(torch.tensor([1, 2, 3]), y, 2, "irm"), torch.tensor([1, 0, 1])
    )
    with pytest.raises(ValueError, match="not y·2 \\+ a"):
        batch_attributes(torch.tensor([1, 0, 3]), y, 2, "irm")


# ------------------------------------------------------------------------------------------------
# CORAL


def test_coral_penalty_matches_numpy_means_and_covariances() -> None:
    g = torch.Generator().manual_seed(7)
    h = torch.randn(15, 4, generator=g, dtype=torch.float64)
    envs = torch.tensor([2, 0, 1] * 5)
    hn, en = h.numpy(), envs.numpy()

    def dist(u, v):
        return np.mean((u.mean(0) - v.mean(0)) ** 2) + np.mean(
            (np.cov(u, rowvar=False, ddof=1) - np.cov(v, rowvar=False, ddof=1)) ** 2
        )

    parts = [hn[en == e] for e in (0, 1, 2)]
    expected = np.mean([dist(parts[i], parts[j]) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert float(coral_penalty(h, envs)) == pytest.approx(expected, rel=1e-10)
    assert float(coral_distance(h[:5], h[5:9])) == pytest.approx(dist(hn[:5], hn[5:9]), rel=1e-10)
    assert float(coral_penalty(h, torch.zeros(15, dtype=torch.long))) == 0.0  # one environment
    assert torch.isfinite(coral_distance(h[:1], h[1:4]))  # one sample: covariance 0, not NaN

    m = _build(CORAL, mmd_gamma=0.5)
    batch = _batch()
    feats, logits = _initial(m, batch)
    logged = _fit_one(m, [batch])
    a = (batch["group"] % 2).numpy()
    pen = dist(feats[a == 0], feats[a == 1])
    ce = _np_ce(logits, batch["label"].numpy()).mean()
    assert logged["train/coral_penalty"] == pytest.approx(pen, rel=1e-5)
    assert logged["train/loss"] == pytest.approx(ce + 0.5 * pen, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# build-time errors

ALL = (ReSample, ReWeight, Mixup, LISA, IRM, CORAL)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_on_data_without_groups_each_fails_at_build_in_one_line(cls) -> None:
    with pytest.raises(TaskInfoError) as e:
        cls(name="m", model=Featurizer(), info=toy_info(None), optimizer=SGD)
    assert (
        "\n" not in str(e.value) and "'num_groups'" in str(e.value) and "data=toy" in str(e.value)
    )


@pytest.mark.parametrize("cls", (LISA, IRM, CORAL), ids=lambda c: c.__name__)
def test_attribute_methods_need_groups_laid_out_as_label_times_attribute(cls) -> None:
    with pytest.raises(ConfigValueError, match="multiple of the number of classes") as e:
        cls(name="m", model=Featurizer(), info=toy_info(3), optimizer=SGD)
    assert "\n" not in str(e.value)
    if cls is not LISA:  # environments = groups needs no attribute
        cls(name="m", model=Featurizer(), info=toy_info(3), optimizer=SGD, environments="group")


# ------------------------------------------------------------------------------------------------
# end to end through the runner

E2E = {
    "resample": ["data.sampler=group_balanced"],
    "reweight": [],
    "mixup": [],
    "lisa": [],
    "irm": ["method.anneal_iters=1"],
    "coral": [],
}
TRAIN_KEYS = {
    "reweight": "train/ce",
    "mixup": "train/mixup_lambda",
    "lisa": "train/lisa_mixed",
    "irm": "train/irm_penalty",
    "coral": "train/coral_penalty",
}


@pytest.mark.parametrize("method", sorted(E2E))
def test_runs_end_to_end_on_group_synth(method: str, tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            f"method={method}",
            "data=group_synth",
            "model=mlp_featurizer",
            "data.dataset_kwargs.n_train=432",
            "data.dataset_kwargs.n_val=100",
            "data.dataset_kwargs.n_test=200",
            "+trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "progress_bar=false",
            "threads=1",
            f"paths.log_dir={tmp_path}",
            *E2E[method],
        ]
    )
    metrics = run(cfg)["metrics"]
    assert 0.0 <= metrics["test/test/worst_group_acc"] <= metrics["test/test/avg_group_acc"] <= 100
    (log,) = tmp_path.glob("*/seed1/csv/metrics.csv")
    rows = list(csv.DictReader(log.open()))
    for key in ("train/loss", TRAIN_KEYS.get(method, "train/worst_group_loss")):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and np.isfinite(values).all(), (key, rows[0].keys())
