"""SCER's embedding regulariser (reprolab.methods.group.scer_math) against a NumPy reference.

Spec robustness_ood_prompting.md §1.8: hand-made group means and Σ give Δ0, Δ, a0 and β as NumPy
computes them; β is the Sherman-Morrison solution (Σ + a0 Δ0Δ0ᵀ)⁻¹Δ, and Σ⁻¹Δ at a0 = 0; L_emb is
finite and passes gradcheck in float64 on d = 4; a batch missing a group gives None.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reprolab.methods.group.scer_math import (
    alignments,
    directions,
    group_means,
    reference_direction,
    regularised_covariance,
    scer_embedding_loss,
    spurious_strength,
)

# Four hand-made group means G0=(y0,a0), G1=(y0,a1), G2=(y1,a0), G3=(y1,a1), d = 4.
MEANS = np.array(
    [
        [0.0, 0.0, 0.5, 1.0],
        [0.0, 2.0, 0.5, 1.5],
        [1.0, 0.0, -0.5, 0.0],
        [1.5, 2.5, 0.0, 0.5],
    ]
)
SIGMA = np.array(
    [
        [1.2, 0.1, 0.0, 0.05],
        [0.1, 1.1, 0.02, 0.0],
        [0.0, 0.02, 1.05, 0.03],
        [0.05, 0.0, 0.03, 1.3],
    ]
)


def np_directions(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d0 = 0.5 * (np.abs(m[1] - m[0]) + np.abs(m[3] - m[2]))
    d = 0.5 * (np.abs(m[2] - m[0]) + np.abs(m[3] - m[1]))
    return d0 / (np.linalg.norm(d0) + 1e-6), d / (np.linalg.norm(d) + 1e-6)


def np_a0(y: np.ndarray, a: np.ndarray) -> float:
    n = len(y)
    p_y1, p_y0 = (y == 1).mean(), (y == 0).mean()
    p_a1_y1 = ((y == 1) & (a == 1)).sum() / (y == 1).sum()
    p_a0_y0 = ((y == 0) & (a == 0)).sum() / (y == 0).sum()
    assert n > 0
    return 0.5 * (p_a1_y1 * p_y1 + p_a0_y0 * p_y0)


def np_beta(sigma: np.ndarray, d: np.ndarray, d0: np.ndarray, a0: float) -> np.ndarray:
    inv = np.linalg.inv(sigma)
    return inv @ d - inv @ d0 * (a0 * (d @ inv @ d0)) / (1 + a0 * (d0 @ inv @ d0))


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def batch(counts=(30, 3, 4, 25), d: int = 4, seed: int = 0):
    """Embeddings whose groups have different means; labels and attributes from `counts`."""
    g = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(len(g), d, generator=gen, dtype=torch.float64) + t(MEANS[:, :d])[g]
    return h, g // 2, g % 2


def test_directions_match_numpy() -> None:
    d0, d = directions(t(MEANS))
    r0, r = np_directions(MEANS)
    np.testing.assert_allclose(d0.numpy(), r0, rtol=1e-12)
    np.testing.assert_allclose(d.numpy(), r, rtol=1e-12)
    assert abs(float(d0.norm()) - 1) < 1e-5 and abs(float(d.norm()) - 1) < 1e-5


def test_group_means_equal_per_group_averages() -> None:
    h, y, a = batch()
    g = y * 2 + a
    means, counts = group_means(h, g, 4)
    assert counts.tolist() == [30, 3, 4, 25]
    for i in range(4):
        np.testing.assert_allclose(means[i].numpy(), h[g == i].mean(0).numpy(), rtol=1e-12)
    means, counts = group_means(h[g != 1], g[g != 1], 4)  # an absent group: count 0, zero mean
    assert counts[1] == 0 and torch.all(means[1] == 0)


def test_a0_matches_numpy_and_simple_cases() -> None:
    _, y, a = batch((30, 3, 4, 25))
    assert float(spurious_strength(y, a)) == pytest.approx(np_a0(y.numpy(), a.numpy()), abs=1e-12)
    # Balanced groups: a0 = 1/4; a perfectly correlated batch: a0 = 1/2.
    assert float(spurious_strength(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))) == (
        pytest.approx(0.25)
    )
    one_to_one = spurious_strength(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert float(one_to_one) == pytest.approx(0.5)
    # A third label (MultiNLI) is ignored, as upstream's groups 0-3.
    y3, a3 = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    assert float(spurious_strength(y3, a3)) == pytest.approx(0.25)


def test_covariance_matches_numpy() -> None:
    h, _, _ = batch()
    c = np.cov(h.numpy(), rowvar=False, ddof=1)
    ref = 0.1 * c / (np.linalg.norm(c, "fro") + 1e-6) + np.eye(4)
    np.testing.assert_allclose(regularised_covariance(h).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("a0", [0.0, 0.25, 0.475])
def test_beta_matches_numpy_and_sherman_morrison(a0: float) -> None:
    r0, r = np_directions(MEANS)
    beta = reference_direction(t(SIGMA), t(r), t(r0), a0).numpy()
    np.testing.assert_allclose(beta, np_beta(SIGMA, r, r0, a0), rtol=1e-10)
    direct = np.linalg.solve(SIGMA + a0 * np.outer(r0, r0), r)  # (Σ + a0 Δ0Δ0ᵀ)⁻¹ Δ
    np.testing.assert_allclose(beta, direct, rtol=1e-10)
    if a0 == 0.0:
        np.testing.assert_allclose(beta, np.linalg.solve(SIGMA, r), rtol=1e-12)


def test_alignments_match_upstream_form() -> None:
    r0, r = np_directions(MEANS)
    beta = np_beta(SIGMA, r, r0, 0.4)
    s, c = alignments(t(beta), t(r), t(r0), t(SIGMA))
    n0, n, nb = (np.sqrt(v @ SIGMA @ v) for v in (r0, r, beta))
    assert float(s) == pytest.approx(n0 * (beta @ r0) / (n0 * nb), rel=1e-12)
    assert float(c) == pytest.approx(n * (beta @ r) / (n * nb), rel=1e-12)


def test_embedding_loss_matches_numpy_end_to_end() -> None:
    h, y, a = batch()
    out = scer_embedding_loss(h, y, a, lambda_spurious=0.7, lambda_core=0.3)
    assert out is not None
    loss, diag = out
    hn, yn, an = h.numpy(), y.numpy(), a.numpy()
    g = yn * 2 + an
    c = np.cov(hn, rowvar=False, ddof=1)
    sigma = 0.1 * c / (np.linalg.norm(c) + 1e-6) + np.eye(4)
    r0, r = np_directions(np.stack([hn[g == i].mean(0) for i in range(4)]))
    a0 = np_a0(yn, an)
    beta = np_beta(sigma, r, r0, a0)
    nb = np.sqrt(beta @ sigma @ beta)
    s, cc = beta @ r0 / nb, beta @ r / nb
    assert float(diag["a0"]) == pytest.approx(a0, abs=1e-12)
    assert float(diag["s"]) == pytest.approx(s, rel=1e-10)
    assert float(diag["c"]) == pytest.approx(cc, rel=1e-10)
    assert float(loss) == pytest.approx(0.7 * abs(s) - 0.3 * cc, rel=1e-10)
    assert not diag["s"].requires_grad


def test_embedding_loss_is_finite_and_passes_gradcheck() -> None:
    h, y, a = batch((5, 3, 3, 5), d=4, seed=1)
    out = scer_embedding_loss(h.float(), y, a, 1.0, 1.0)
    assert out is not None and torch.isfinite(out[0])
    h = h.clone().requires_grad_(True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return scer_embedding_loss(x, y, a, lambda_spurious=1.0, lambda_core=0.5)[0]

    assert torch.autograd.gradcheck(f, (h,), eps=1e-6, atol=1e-5)


def test_head_beta_source_and_its_gradient() -> None:
    h, y, a = batch((5, 3, 3, 5), d=4, seed=2)
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    loss, diag = scer_embedding_loss(h, y, a, 1.0, 1.0, beta_source="head", head_weight=w)
    beta = (w[1] - w[0]).detach()
    sigma = regularised_covariance(h)
    d0, d = directions(group_means(h, y * 2 + a, 4)[0])
    s, c = alignments(beta, d, d0, sigma)
    assert float(diag["s"]) == pytest.approx(float(s))
    assert float(diag["c"]) == pytest.approx(float(c))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="head_weight"):
        scer_embedding_loss(h, y, a, 1.0, 1.0, beta_source="head")
    with pytest.raises(ValueError, match="beta_source"):
        scer_embedding_loss(h, y, a, 1.0, 1.0, beta_source="learned")


def test_missing_group_returns_none() -> None:
    h, y, a = batch((6, 0, 4, 5))
    assert scer_embedding_loss(h, y, a, 1.0, 1.0) is None
    h, y, a = batch((6, 2, 4, 5))
    assert scer_embedding_loss(h, y, a, 1.0, 1.0) is not None


def test_half_precision_and_bad_attribute() -> None:
    h, y, a = batch()
    loss, _ = scer_embedding_loss(h.to(torch.bfloat16), y, a, 1.0, 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="binary spurious attribute"):
        scer_embedding_loss(h, y, a + 1, 1.0, 1.0)
