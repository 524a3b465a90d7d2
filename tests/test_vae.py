"""Tabular VAE: the task contract on a non-CLIP family (data -> TabularInfo -> network -> ELBO)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from reprolab.data.info import Column, ImageClassificationInfo, TabularInfo, TaskInfoError
from reprolab.data.tabular import (
    CAUSAL_GRAPH,
    TabularDataModule,
    causal_table,
    causal_table_log_prob,
)
from reprolab.methods.generative.vae import TabularVAE, column_log_likelihood, gaussian_kl
from reprolab.models.vae import TabularVAENet

COLUMNS = (
    Column("x", "continuous"),
    Column("b", "binary"),
    Column("c", "categorical", 3),
    Column("w", "continuous"),
)


def test_trained_vae_beats_its_initialisation_on_held_out_rows(run_experiment) -> None:
    """Held-out ELBO (nats per row) of the 40-epoch VAE vs the same network untrained.

    Measured (CPU, seeds 1 / 2 / 3): trained -5.275 / -5.271 / -5.281, untrained -6.395 / -6.392 /
    -6.356, so the gap is 1.08-1.12 nats; the true model's log-likelihood of these rows is -5.179.
    The test asks for half the smallest gap, and that the ELBO stays below the true
    log-likelihood (a bound on any model's held-out log-likelihood, up to sampling noise): an
    ELBO above it would mean a density bug (a missing normaliser, a wrong standardisation).
    """
    trained = run_experiment("vae_causal_table")
    untrained = run_experiment("vae_untrained_causal_table")
    for m in (trained, untrained):
        assert m["test/elbo"] == pytest.approx(m["test/recon"] - m["test/kl"], abs=1e-4)
        assert m["test/elbo"] == m["test/test/elbo"] and "test/test_do_a1/elbo" in m
        assert m["test/kl"] >= 0
    assert trained["test/elbo"] > untrained["test/elbo"] + 0.5, (trained, untrained)

    dm = TabularDataModule("causal_table", "causal_table")
    log_p = causal_table_log_prob(dm.table.splits["test"]).mean()
    log_p += math.log(dm.stats["X1"][1]) + math.log(dm.stats["X2"][1])  # standardised units
    assert trained["test/elbo"] < log_p + 0.15, (trained["test/elbo"], log_p)
    assert trained["params/trainable"] == trained["params/total"] > 0


def test_column_likelihood_and_kl_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    n = 7
    x = torch.cat(
        [
            torch.randn(n, 1, generator=g),
            torch.randint(0, 2, (n, 1), generator=g).float(),
            torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float(),
            torch.randn(n, 1, generator=g),
        ],
        dim=1,
    )  # (n, 6)
    params = [torch.randn(2, n, w, generator=g) for w in (1, 1, 3, 1)]  # 2 z-samples per row
    log_std = torch.tensor([0.3, -0.7])
    ll = column_log_likelihood(x, params, COLUMNS, log_std)  # (2, n, 4)
    assert ll.shape == (2, n, 4)
    want = torch.stack(
        [
            D.Normal(params[0][..., 0], log_std[0].exp()).log_prob(x[:, 0]),
            D.Bernoulli(logits=params[1][..., 0]).log_prob(x[:, 1]),
            D.Categorical(logits=params[2]).log_prob(x[:, 2:5].argmax(1)),
            D.Normal(params[3][..., 0], log_std[1].exp()).log_prob(x[:, 5]),
        ],
        dim=-1,
    )
    torch.testing.assert_close(ll, want)

    mu, logvar = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    q, prior = D.Normal(mu, (0.5 * logvar).exp()), D.Normal(torch.zeros(5), torch.ones(5))
    torch.testing.assert_close(gaussian_kl(mu, logvar), D.kl_divergence(q, prior).sum(-1))


def test_elbo_is_reparameterised_monte_carlo_of_the_bound() -> None:
    """`elbo_terms` equals an independent computation from the same noise, and its gradient flows
    into the encoder through the sample (reparameterisation)."""
    info = TabularInfo(name="toy", columns=COLUMNS)
    net = TabularVAENet(num_features=info.num_features, param_widths=[1, 1, 3, 1], latent_dim=3)
    vae = TabularVAE(name="vae", model=net, info=info, gaussian_scale="learned", init_std=0.5)
    x = torch.cat([torch.randn(4, 2), torch.eye(3)[[0, 1, 2, 0]], torch.randn(4, 1)], dim=1)
    x[:, 1] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    torch.manual_seed(3)
    t = vae.elbo_terms(x, samples=5)
    torch.manual_seed(3)
    mu, logvar = net.encode(x)
    z = D.Normal(mu, (0.5 * logvar).exp()).rsample((5,))  # (5, 4, 3), same noise draw
    p = net.decode(z)
    std = torch.tensor(0.5)
    log_px = (
        D.Normal(p[0][..., 0], std).log_prob(x[:, 0])
        + D.Bernoulli(logits=p[1][..., 0]).log_prob(x[:, 1])
        + D.Categorical(logits=p[2]).log_prob(x[:, 2:5].argmax(1))
        + D.Normal(p[3][..., 0], std).log_prob(x[:, 5])
    ).mean(0)
    kl = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(t["recon"], log_px)
    torch.testing.assert_close(t["elbo"], log_px - kl)
    t["recon"].sum().backward()
    assert net.encoder[0].weight.grad is not None and net.encoder[0].weight.grad.abs().sum() > 0
    assert vae.raw_log_std.grad is not None


def test_causal_table_respects_its_graph() -> None:
    from sklearn.linear_model import LogisticRegression

    r = causal_table(20_000, seed=5)
    corr = lambda a, b: float(np.corrcoef(r[a], r[b])[0, 1])  # noqa: E731
    assert abs(corr("A", "U")) < 0.03  # exogenous, independent
    assert abs(corr("A", "X3")) < 0.03  # X3's only parent is U
    assert corr("A", "X1") > 0.3 and corr("A", "X2") < -0.3 and corr("U", "X1") > 0.5
    assert corr("U", "X3") > 0.4
    # Y depends on A only through X1, X2: conditioning on them leaves no coefficient on A.
    feats = np.stack([r["X1"], r["X2"], r["A"]], axis=1)
    coef = LogisticRegression(C=1e4, max_iter=1000).fit(feats, r["Y"]).coef_[0]
    assert coef[0] == pytest.approx(1.5, abs=0.15) and coef[1] == pytest.approx(1.0, abs=0.15)
    assert abs(coef[2]) < 0.1
    do = causal_table(2000, seed=5, do_a=1)
    assert (do["A"] == 1).all() and do["X1"].mean() > r["X1"].mean() + 0.3
    np.testing.assert_array_equal(causal_table(50, seed=5)["C"], causal_table(50, seed=5)["C"])


def test_tabular_data_module_encodes_and_publishes_its_info() -> None:
    dm = TabularDataModule("causal_table", "causal_table")
    info = dm.info
    assert info.sensitive == "A" and info.target == "Y" and info.causal_graph == CAUSAL_GRAPH
    assert info.num_features == 9 and [t.role for t in info.test_sets] == ["id", "shift"]
    dm.setup()
    train = dm._splits["train"].tensors
    assert train["x"].shape == (4000, 9) and len(dm._splits["test_do_a1"]) == 1000
    torch.testing.assert_close(train["x"][:, 1:3].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(train["x"][:, 1:3].std(0, unbiased=False), torch.ones(2))
    assert (train["x"][:, 4:8].sum(1) == 1).all()  # one-hot C
    torch.testing.assert_close(train["sensitive"].float(), train["x"][:, 0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (128, 9) and set(batch) == {"x", "sensitive", "target", "index"}

    diabetes = TabularDataModule("diabetes", "diabetes", exclude=["sex"])
    diabetes.setup()
    assert [len(diabetes._splits[s]) for s in ("train", "val", "test")] == [310, 66, 66]
    assert diabetes.info.num_features == 10 and "sex" not in [c.name for c in diabetes.columns]
    assert set(diabetes._splits["test"].tensors["sensitive"].tolist()) == {0, 1}

    with pytest.raises(ValueError, match="did you mean 'diabetes'"):
        TabularDataModule("x", "diabetis")


def test_a_method_needing_class_names_fails_at_build_time_on_tabular_data() -> None:
    from reprolab.methods.zeroshot import ZeroShot

    info = TabularDataModule("diabetes", "diabetes").info
    with pytest.raises(TaskInfoError, match="needs") as e:
        ZeroShot(name="zeroshot", model=None, info=info)
    assert "\n" not in str(e.value) and "data=diabetes" in str(e.value)
    with pytest.raises(TaskInfoError, match="needs 'columns'"):
        TabularVAE(name="vae", model=None, info=TabularInfo(name="empty"))
    with pytest.raises(TaskInfoError, match="needs a tabular task"):
        TabularVAE(
            name="vae", model=None, info=ImageClassificationInfo(name="s", classnames=("a",))
        )
