"""SPSA / SPSA-GC (BlackVIP spec §3), BAR's RGF estimator (§4.2) and their schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from reprolab.optim.rgf import RGF
from reprolab.optim.schedules import poly_decay_lr, spsa_gains
from reprolab.optim.spsa import SPSA

H = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)


def quartic_rows(thetas: Tensor) -> Tensor:
    """A smooth non-quadratic loss, evaluated row-wise.  # (R, N) -> (R,)"""
    return (
        0.5 * (H * thetas**2).sum(-1) + 0.1 * (thetas**4).sum(-1) + thetas[..., 0] * thetas[..., 1]
    )


def test_gains_match_formulas() -> None:
    a_k, c_k = spsa_gains(3, a=0.01, c=0.005, alpha=0.4, gamma=0.2, o=1.0)
    assert a_k == pytest.approx(0.01 / 4**0.4)
    assert c_k == pytest.approx(0.005 / 3**0.2)
    with pytest.raises(ValueError):
        spsa_gains(0, 1, 1, 1, 1)


@pytest.mark.parametrize("gc", [True, False])
def test_spsa_matches_hand_computed_updates(gc: bool) -> None:
    a, c, alpha, gamma, o, beta = 0.05, 0.01, 0.4, 0.2, 1.0, 0.9
    gen = torch.Generator().manual_seed(0)
    deltas = [
        torch.where(torch.rand(2, 4, generator=gen) < 0.5, -1.0, 1.0).double()
        * (0.5 + 0.5 * torch.rand(2, 4, generator=gen).double())
        for _ in range(3)
    ]  # three steps of q = 2 fixed perturbations
    phi = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    opt = SPSA(phi, a=a, c=c, alpha=alpha, gamma=gamma, o=o, momentum=beta, n_perturb=2, gc=gc)
    calls = iter(deltas)
    opt.sample_perturbations = lambda: next(calls)  # type: ignore[method-assign]

    expected = phi.clone()
    m = None
    for k in range(1, 4):
        a_k = a / (k + o) ** alpha
        c_k = c / k**gamma
        g = torch.zeros(4, dtype=torch.float64)
        for delta in deltas[k - 1]:
            lp = quartic_rows((expected + c_k * delta)[None])[0]
            lm = quartic_rows((expected - c_k * delta)[None])[0]
            g += (lp - lm) / (2 * c_k) / delta
        g /= 2
        if gc:
            m = g if m is None else beta * m + g
            expected = expected - a_k * (g + beta * m)
        else:
            expected = expected - a_k * g
        losses = opt.step(quartic_rows)
        assert losses.shape == (4,)
        torch.testing.assert_close(phi, expected, rtol=1e-12, atol=1e-12)
    assert opt.k == 3


def test_batched_equals_sequential() -> None:
    init = torch.linspace(-1, 1, 7, dtype=torch.float64)
    p_batched, p_seq = init.clone(), init.clone()
    kw = dict(a=0.05, c=0.01, alpha=0.4, gamma=0.1, momentum=0.9, n_perturb=5, seed=3)
    opt_b, opt_s = SPSA(p_batched, **kw), SPSA(p_seq, **kw)
    rows_seen: list[Tensor] = []

    def one(theta: Tensor) -> Tensor:
        rows_seen.append(theta.clone())
        return 0.5 * (theta**2).sum() + theta[0] ** 3

    for _ in range(4):
        lb = opt_b.step(lambda th: 0.5 * (th**2).sum(-1) + th[:, 0] ** 3)
        ls = opt_s.step(one, batched=False)
        torch.testing.assert_close(lb, ls, rtol=0, atol=1e-12)
    torch.testing.assert_close(p_batched, p_seq, rtol=0, atol=1e-12)
    # Sequential order: +Delta_1, -Delta_1, ... (rows 0 and 1 are symmetric around the iterate).
    assert len(rows_seen) == 4 * 10
    mid01 = (rows_seen[0] + rows_seen[1]) / 2
    mid23 = (rows_seen[2] + rows_seen[3]) / 2
    torch.testing.assert_close(mid01, init, atol=1e-12, rtol=0)
    torch.testing.assert_close(mid23, init, atol=1e-12, rtol=0)


def test_perturbation_distributions() -> None:
    opt = SPSA(torch.zeros(5000), a=1, c=1, n_perturb=3, seed=0)
    d = opt.sample_perturbations()
    assert d.shape == (3, 5000)
    assert ((d.abs() >= 0.5) & (d.abs() < 1.0)).all()
    assert 0.45 < (d > 0).float().mean() < 0.55
    rad = SPSA(
        torch.zeros(5000), a=1, c=1, n_perturb=2, perturb="rademacher"
    ).sample_perturbations()
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    # Same seed, same draws (what keeps DDP ranks in sync).
    torch.testing.assert_close(
        d, SPSA(torch.zeros(5000), a=1, c=1, n_perturb=3, seed=0).sample_perturbations()
    )
    with pytest.raises(ValueError, match="rademacher"):
        SPSA(torch.zeros(3), a=1, c=1, perturb="gauss")  # type: ignore[arg-type]


def _noisy_quadratic_run(gc: bool, seed: int, steps: int = 150, d: int = 20) -> float:
    """Final true loss after SPSA(-GC) on a quadratic whose minibatch loss has a random shift."""
    noise = torch.Generator().manual_seed(1000 + seed)
    h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    phi = torch.full((d,), 3.0, dtype=torch.float64)
    opt = SPSA(
        phi, a=0.01, c=0.01, alpha=0.4, gamma=0.1, momentum=0.9, n_perturb=5, gc=gc, seed=seed
    )
    for _ in range(steps):
        xi = 0.5 * torch.randn(d, generator=noise, dtype=torch.float64)  # this step's minibatch
        opt.step(lambda th, xi=xi: 0.5 * ((th - xi) ** 2 * h).sum(-1))
    return float(0.5 * (h * phi**2).sum())


def test_spsa_gc_beats_plain_spsa_at_equal_queries() -> None:
    seeds = range(5)
    gc = [_noisy_quadratic_run(True, s) for s in seeds]
    plain = [_noisy_quadratic_run(False, s) for s in seeds]
    start = 0.5 * 9 * float(torch.linspace(0.5, 2.0, 20).sum())
    assert all(g < p for g, p in zip(gc, plain, strict=True))
    assert sum(gc) / 5 < 0.2 * sum(plain) / 5 < 0.2 * start


def test_state_dict_roundtrip_resumes_exactly() -> None:
    def loss(th: Tensor) -> Tensor:
        return (th**2).sum(-1) + th[:, 0]

    ref = torch.ones(6, dtype=torch.float64)
    opt = SPSA(ref, a=0.1, c=0.01, seed=7)
    for _ in range(2):
        opt.step(loss)
    state = opt.state_dict()
    resumed = ref.clone()
    for _ in range(3):
        opt.step(loss)
    opt2 = SPSA(resumed, a=0.1, c=0.01, seed=999)  # seed is overridden by the generator state
    opt2.load_state_dict(state)
    for _ in range(3):
        opt2.step(loss)
    torch.testing.assert_close(resumed, ref, rtol=0, atol=0)
    assert opt2.k == 5


def test_failed_loss_leaves_state_untouched_and_stats_exposed() -> None:
    phi = torch.zeros(3)
    opt = SPSA(phi, a=0.1, c=0.1, seed=0)
    before = opt.generator.get_state()

    def boom(th: Tensor) -> Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(boom)
    assert opt.k == 0 and torch.equal(opt.generator.get_state(), before) and phi.eq(0).all()
    with pytest.raises(ValueError, match="one loss per parameter row"):
        opt.step(lambda th: th.sum())
    opt.step(lambda th: ((th - 1) ** 2).sum(-1))
    assert set(opt.stats) >= {"loss", "loss_mean", "grad_norm", "a_k", "c_k"}
    assert opt.queries_per_step == 10


def test_spsa_updates_module_parameters_in_place() -> None:
    lin = torch.nn.Linear(3, 2)
    before = torch.nn.utils.parameters_to_vector(lin.parameters()).detach().clone()
    opt = SPSA(lin.parameters(), a=0.1, c=0.01)
    opt.step(lambda th: (th**2).sum(-1))
    after = torch.nn.utils.parameters_to_vector(lin.parameters()).detach()
    assert opt.num_params == 8 and not torch.equal(before, after)
    assert after.norm() < before.norm()


def test_rgf_estimate_points_downhill() -> None:
    d = 30
    h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w = torch.linspace(-1, 1, d, dtype=torch.float64)
    grad = h * w
    opt = RGF(w.clone(), lr0=0.1, lr_min=0.01, total_steps=100, n_dirs=400, smoothing=1e-4, seed=0)
    dirs = opt.sample_directions().double()
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(400, dtype=torch.float64))
    rows = torch.cat([w[None], w[None] + 1e-4 * dirs])
    losses = 0.5 * (h * rows**2).sum(-1)
    ghat = opt.estimate(losses, dirs)
    cos = float(ghat @ grad / (ghat.norm() * grad.norm()))
    assert cos > 0.7  # (d/q) sum u u^T grad -> grad as q grows


def test_rgf_steps_decrease_loss_and_batched_equals_sequential() -> None:
    d = 10
    h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)

    def loss_rows(th: Tensor) -> Tensor:
        return 0.5 * (h * th**2).sum(-1)

    w_b = torch.full((d,), 2.0, dtype=torch.float64)
    w_s = w_b.clone()
    kw = dict(lr0=0.05, lr_min=0.005, total_steps=200, n_dirs=5, smoothing=0.01, seed=1)
    opt_b, opt_s = RGF(w_b, **kw), RGF(w_s, **kw)
    start = float(loss_rows(w_b[None])[0])
    for _ in range(200):
        lb = opt_b.step(loss_rows)
        ls = opt_s.step(lambda th: loss_rows(th[None])[0], batched=False)
        assert lb.shape == (6,)
        torch.testing.assert_close(lb, ls, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_b, w_s, rtol=0, atol=1e-12)
    assert float(loss_rows(w_b[None])[0]) < 0.1 * start
    assert opt_b.queries_per_step == 6
    state = opt_b.state_dict()
    opt_c = RGF(w_b.clone(), **kw)
    opt_c.load_state_dict(state)
    assert opt_c.t == 200 and torch.equal(opt_c.sample_directions(), opt_b.sample_directions())


def test_poly_decay_schedule() -> None:
    total, lr0, lr_min = 1000, 10.0, 0.1
    td = 0.9 * total
    assert poly_decay_lr(1, total, lr0, lr_min) == pytest.approx(
        (lr0 - lr_min) * (1 - 1 / td) ** 0.9 + lr_min
    )
    assert poly_decay_lr(450, total, lr0, lr_min) == pytest.approx(
        (lr0 - lr_min) * 0.5**0.9 + lr_min
    )
    assert poly_decay_lr(900, total, lr0, lr_min) == pytest.approx(lr_min)
    assert poly_decay_lr(1000, total, lr0, lr_min) == pytest.approx(lr_min)
    opt = RGF(torch.zeros(2), lr0=lr0, lr_min=lr_min, total_steps=total)
    assert opt.lr() == pytest.approx(poly_decay_lr(1, total, lr0, lr_min))
    assert math.isclose(opt.lr(2000), lr_min)
