"""Group-robustness methods (erm, groupdro, sam, asam, asgdro) and the SAM wrapper, against
independent references: NumPy for GroupDRO's q update and the (A)SAM perturbations, a hand-written
SGD step for the two-pass update, and the identities ASGDRO(ρ=0) = GroupDRO, ASGDRO(one group) = ASAM
(spec robustness_ood_prompting.md §2.5)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _group_helpers import CountedBatchData, Featurizer, fit_batches, toy_info
from torch import nn

from reprolab.data.info import TaskInfoError
from reprolab.methods.group.asgdro import ASGDRO
from reprolab.methods.group.erm import ERM
from reprolab.methods.group.groupdro import GroupDRO, GroupWeights, update_group_weights
from reprolab.methods.group.sam import ASAMMethod, SAMMethod
from reprolab.optim.sam import SAM, frozen_bn_stats, unscaled_params

# ------------------------------------------------------------------------------------------------
# GroupDRO's q update


def _numpy_q(losses, present, eta, c, n, update_absent=False):
    """group_DRO / SubpopBench by hand: q over 3 steps, starting uniform."""
    q = np.full(len(n), 1.0 / len(n))
    out = []
    for L_g, p in zip(losses, present, strict=True):
        adj = c / np.sqrt(np.asarray(n, dtype=float))
        for g in range(len(n)):
            if p[g] or update_absent:
                loss = L_g[g] if p[g] else 0.0
                q[g] = q[g] * np.exp(eta * (loss + adj[g]))
        q = q / q.sum()
        out.append(q.copy())
    return out


# step 2: group 1 absent (its 0 is not used)
LOSSES = [[0.9, 0.4, 1.6], [0.2, 0.0, 2.5], [1.1, 0.7, 0.3]]
PRESENT = [[True, True, True], [True, False, True], [True, True, True]]
COUNTS = [100.0, 25.0, 4.0]


@pytest.mark.parametrize("c", [0.0, 2.0])
def test_update_group_weights_matches_a_hand_computation(c: float) -> None:
    eta = 0.3
    ref = _numpy_q(LOSSES, PRESENT, eta, c, COUNTS)
    q = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    adj = torch.tensor([c / np.sqrt(n) for n in COUNTS], dtype=torch.float64)
    for step, (L_g, p) in enumerate(zip(LOSSES, PRESENT, strict=True)):
        before = q.clone()
        new = update_group_weights(
            q, torch.tensor(L_g, dtype=torch.float64), torch.tensor(p), eta, adj if c else None
        )
        assert torch.equal(q, before)  # pure: the input q is not modified
        q = new
        np.testing.assert_allclose(q.numpy(), ref[step], rtol=1e-12)
        assert abs(float(q.sum()) - 1.0) < 1e-12
    # the absent group of step 2 keeps its weight up to the renormalisation (no loss, no adjustment)
    q1 = _numpy_q(LOSSES[:1], PRESENT[:1], eta, c, COUNTS)[0]
    q2 = ref[1]
    others = np.exp(eta * (np.array(LOSSES[1]) + c / np.sqrt(COUNTS)))[[0, 2]] * q1[[0, 2]]
    np.testing.assert_allclose(q2[1], q1[1] / (q1[1] + others.sum()), rtol=1e-12)


def test_update_group_weights_largest_loss_gains_weight() -> None:
    q = torch.tensor([0.2, 0.5, 0.3])
    new = update_group_weights(
        q, torch.tensor([0.1, 0.2, 3.0]), torch.ones(3, dtype=torch.bool), 1.0
    )
    assert abs(float(new.sum()) - 1.0) < 1e-6
    assert new[2] > q[2] and new[0] < q[0]  # the worst group gains, the best loses
    assert new[2] / new[1] > q[2] / q[1]  # relative to every other group too


def test_group_weights_update_absent_is_group_dros_rule_and_loss_is_q_weighted() -> None:
    gw = GroupWeights(3, eta=0.3, adjustment=2.0, update_absent=True)
    gw.set_group_counts(torch.tensor(COUNTS))
    ref = _numpy_q(LOSSES, PRESENT, 0.3, 2.0, COUNTS, update_absent=True)
    for step in range(3):
        groups = torch.tensor([g for g in range(3) if PRESENT[step][g] for _ in range(2)])
        per_sample = torch.tensor([LOSSES[step][g] for g in groups.tolist()], requires_grad=True)
        loss, losses, counts = gw(per_sample, groups)
        np.testing.assert_allclose(gw.q.numpy(), ref[step], rtol=1e-5)
        expected = sum(ref[step][g] * LOSSES[step][g] for g in range(3) if PRESENT[step][g])
        # Σ q L over the groups present; the adjustment is not added to the loss
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the gradient flows through the group means, not through q
    assert per_sample.grad is not None
    assert "q" in gw.state_dict() and "adjust" not in gw.state_dict()  # q is checkpointed


# ------------------------------------------------------------------------------------------------
# The SAM wrapper on a 3-parameter model: y = w·x + b, loss (y - t)²


X, T = np.array([0.7, -1.3]), 0.4
W0, B0 = np.array([0.5, -2.0]), np.array([0.25])


def _grads(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = float(w @ X + b[0] - T)
    return 2 * r * X, np.array([2 * r])


def _model() -> nn.Linear:
    m = nn.Linear(2, 1).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(W0)[None])
        m.bias.copy_(torch.from_numpy(B0))
    return m


def _backward(m: nn.Linear) -> None:
    ((m(torch.from_numpy(X)[None]) - T) ** 2).sum().backward()


def _eps_by_hand(rho: float, mode: str, eta: float = 0.0) -> np.ndarray:
    gw, gb = _grads(W0, B0)
    theta, g = np.concatenate([W0, B0]), np.concatenate([gw, gb])
    if mode == "sam":
        return rho * g / np.linalg.norm(g)
    if mode == "asam_all":  # spec §2.2: ρ w² g / ‖|w| g‖
        return rho * theta**2 * g / np.linalg.norm(np.abs(theta) * g)
    t = np.concatenate([np.abs(W0) + eta, [1.0]])  # SamsungLabs/ASAM: the bias is not adapted
    return rho * t**2 * g / np.linalg.norm(t * g)


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [
        ("sam", {"adaptive": False}),
        ("asam_all", {"adaptive": True}),
        ("asam_weights", {"adaptive": True, "eta": 0.01}),
    ],
)
def test_perturbation_matches_the_formula(mode: str, kwargs: dict) -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    unscaled = unscaled_params(m) if mode == "asam_weights" else ()
    sam = SAM(None, opt, rho=0.2, unscaled=unscaled, **kwargs)
    _backward(m)
    sam.first_step()
    eps = _eps_by_hand(0.2, mode, kwargs.get("eta", 0.0))
    got = np.concatenate([m.weight.detach().numpy()[0], m.bias.detach().numpy()])
    np.testing.assert_allclose(got - np.concatenate([W0, B0]), eps, rtol=1e-9, atol=1e-14)
    assert all(p.grad is None for p in m.parameters())  # zero_grad after the first step
    if mode == "asam_weights":
        assert len(unscaled) == 1 and unscaled[0] is m.bias


def test_second_step_restores_w_exactly_and_steps_with_the_gradient_at_w_plus_eps() -> None:
    rho, lr, mom, wd = 0.3, 0.1, 0.9, 0.01
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    sam = SAM(None, opt, rho=rho, adaptive=True)
    theta, buf = np.concatenate([W0, B0]), None
    for _ in range(2):  # two steps: the momentum buffer carries the first one's gradient
        g = np.concatenate(_grads(theta[:2], theta[2:]))
        eps = rho * theta**2 * g / np.linalg.norm(np.abs(theta) * g)
        g2 = np.concatenate(_grads(theta[:2] + eps[:2], theta[2:] + eps[2:]))  # at w + ε
        d = g2 + wd * theta  # SGD's weight decay at w (restored), not at w + ε
        buf = d if buf is None else mom * buf + d
        theta = theta - lr * buf
        _backward(m)
        sam.first_step()
        _backward(m)
        sam.second_step()
    got = np.concatenate([m.weight.detach().numpy()[0], m.bias.detach().numpy()])
    np.testing.assert_allclose(got, theta, rtol=1e-10)

    # with a zero learning rate the weights are back bit for bit
    m = _model()
    sam = SAM(None, torch.optim.SGD(m.parameters(), lr=0.0), rho=0.5)
    before = [p.detach().clone() for p in m.parameters()]
    _backward(m)
    sam.first_step()
    assert not torch.equal(m.weight, before[0])
    _backward(m)
    sam.second_step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))
    assert sam.state_dict() == sam.base_optimizer.state_dict()


def test_frozen_bn_stats_stops_running_statistics_only_inside_the_block() -> None:
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(16, 3)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    free = copy.deepcopy(bn)
    with frozen_bn_stats(bn):
        y = bn(x)
    assert all(torch.equal(v, state[k]) for k, v in bn.state_dict().items())  # nothing moved
    torch.testing.assert_close(y, free(x))  # still normalised with the batch's statistics
    assert bn[1].track_running_stats
    bn(x)
    assert int(bn[1].num_batches_tracked) == 1 and not torch.equal(
        bn[1].running_mean, state["1.running_mean"]
    )


# ------------------------------------------------------------------------------------------------
# The methods, on a small featurizer with Lightning


def _batches(num_groups: int, n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(8, 3, generator=g)
        y = torch.randint(0, 2, (8,), generator=g)
        groups = torch.randint(0, num_groups, (8,), generator=g)
        if i == 1 and num_groups > 1:
            groups = groups.clamp(max=num_groups - 2)  # the last group is absent from batch 1
        out.append({"image": x, "label": y, "group": groups})
    return out


def _fit(method, batches: list[dict], counts: list[float], seed: int = 0):
    if method.head is None:
        torch.manual_seed(seed)
        method.head = method.build_head("random")
    return fit_batches(method, CountedBatchData(batches, counts))


SGD = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=1e-3)


def _params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_asgdro_at_rho_zero_is_groupdro() -> None:
    torch.manual_seed(1)
    net = Featurizer(bn=True)
    batches, counts = _batches(4), [40.0, 10.0, 5.0, 45.0]
    dro_kw = {"eta": 0.5, "adjustment": 1.0, "update_absent": True, "optimizer": SGD}
    a = GroupDRO(name="groupdro", model=copy.deepcopy(net), info=toy_info(4), **dro_kw)
    b = ASGDRO(name="asgdro", model=copy.deepcopy(net), info=toy_info(4), rho=0.0, **dro_kw)
    ta, tb = _fit(a, batches, counts), _fit(b, batches, counts)
    assert ta.global_step == tb.global_step == 3
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.dro.q, b.dro.q)
    assert not torch.allclose(a.dro.q, torch.full((4,), 0.25))  # q moved
    torch.testing.assert_close(a.backbone.net[1].running_mean, b.backbone.net[1].running_mean)
    c = ASGDRO(name="asgdro", model=copy.deepcopy(net), info=toy_info(4), rho=0.5, **dro_kw)
    _fit(c, batches, counts)
    assert not torch.allclose(_params(c)["head.weight"], pa["head.weight"])  # ρ > 0 does differ


def test_a_frozen_featurizer_is_encoded_once_per_two_pass_step(monkeypatch) -> None:
    """Frozen features are the same at w and w + ε: one featurizer call per step, and the steps
    equal those of a run that encodes twice (the head sees identical inputs)."""
    torch.manual_seed(3)
    net = Featurizer("none")
    batches, counts = _batches(4), [40.0, 10.0, 5.0, 45.0]
    kw = {"eta": 0.5, "rho": 0.5, "optimizer": SGD}
    once = ASGDRO(name="asgdro", model=copy.deepcopy(net), info=toy_info(4), **kw)
    twice = ASGDRO(name="asgdro", model=copy.deepcopy(net), info=toy_info(4), **kw)
    calls = {"n": 0}
    encode = Featurizer.encode_image

    def counted(self, x):
        calls["n"] += 1
        return encode(self, x)

    monkeypatch.setattr(Featurizer, "encode_image", counted)
    _fit(once, batches, counts)
    assert calls["n"] == 3  # three steps, one encoding each
    twice._backbone_trains = True  # the path of a trainable featurizer: encodes in both passes
    calls["n"] = 0
    _fit(twice, batches, counts)
    assert calls["n"] == 6
    for k, v in _params(once).items():
        torch.testing.assert_close(v, _params(twice)[k], rtol=0, atol=0)


def test_asgdro_with_one_group_is_asam_and_the_scheduler_and_clipping_apply() -> None:
    torch.manual_seed(2)
    net = Featurizer(bn=True)
    batches = _batches(1)
    sched = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 0.5**s)
    kw = {
        "rho": 0.1,
        "asam_eta": 0.0,
        "adaptive_params": "all",
        "optimizer": SGD,
        "scheduler": sched,
    }
    a = ASAMMethod(name="asam", model=copy.deepcopy(net), info=toy_info(1), **kw)
    b = ASGDRO(
        name="asgdro", model=copy.deepcopy(net), info=toy_info(1), eta=0.5, adjustment=0.0, **kw
    )
    ta = _fit(a, batches, [24.0])
    _fit(b, batches, [24.0])
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-6, atol=1e-7)
    assert float(b.dro.q[0]) == 1.0
    assert ta.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**3)  # stepped 3 times

    # gradient clipping (method.grad_clip) bounds the manual step: plain SGD, lr 1
    c = SAMMethod(
        name="sam",
        model=copy.deepcopy(net),
        info=toy_info(1),
        rho=0.1,
        grad_clip=1e-3,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    torch.manual_seed(0)
    c.head = c.build_head("random")
    before = torch.cat([p.detach().flatten().clone() for p in c.parameters()])
    _fit(c, batches[:1], [8.0])
    after = torch.cat([p.detach().flatten() for p in c.parameters()])
    assert 0 < float((after - before).norm()) <= 1e-3 + 1e-7


def test_bn_running_statistics_are_updated_once_per_two_pass_step() -> None:
    """Pass 1 at w updates BatchNorm's running statistics; pass 2 at w + ε does not."""
    torch.manual_seed(3)
    net = Featurizer(bn=True)
    batches = _batches(4, n=1)
    ref = copy.deepcopy(net).train()
    ref.encode_image(batches[0]["image"])  # one train-mode pass at the initial w
    m = ASGDRO(name="asgdro", model=copy.deepcopy(net), info=toy_info(4), rho=0.5, optimizer=SGD)
    _fit(m, batches, [1.0] * 4)
    bn, bn_ref = m.backbone.net[1], ref.net[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert not torch.allclose(m.backbone.net[0].weight, net.net[0].weight)  # it did train


def test_group_method_on_data_without_groups_fails_at_build_in_one_line() -> None:
    for cls in (ERM, GroupDRO, ASGDRO):
        with pytest.raises(TaskInfoError) as e:
            cls(name="erm", model=Featurizer(), info=toy_info(None), optimizer=SGD)
        msg = str(e.value)
        assert "\n" not in msg and "'num_groups'" in msg and "data=toy" in msg


def test_zeroshot_head_needs_a_text_tower() -> None:
    from reprolab.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"head_init=random") as e:
        ERM(name="erm", model=Featurizer(), info=toy_info(4), head_init="zeroshot", optimizer=SGD)
    assert "\n" not in str(e.value)


def test_adjustment_without_group_counts_fails_in_one_line() -> None:
    gw = GroupWeights(4, eta=0.1, adjustment=2.0, name="asgdro")
    with pytest.raises(ValueError, match=r"method.adjustment=0") as e:
        gw.setup_from(None)
    assert "\n" not in str(e.value)
    GroupWeights(4, eta=0.1, adjustment=0.0).setup_from(None)  # C = 0 needs no counts


# ------------------------------------------------------------------------------------------------
# End to end through the runner


@pytest.fixture
def group_overrides(tmp_path: Path) -> list[str]:
    return [
        "model=tiny_clip",
        "data=group_shapes",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "logger=csv",
        f"paths.log_dir={tmp_path}",
        "progress_bar=false",
        "threads=1",
    ]


@pytest.mark.parametrize("method", ["erm", "asgdro"])
def test_runs_end_to_end_on_group_shapes(method: str, group_overrides: list[str]) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    record = run(compose_train([*group_overrides, f"method={method}"]))
    m = record["metrics"]
    assert 0.0 <= m["test/test/worst_group_acc"] <= m["test/test/avg_group_acc"] <= 100.0
    assert record["global_step"] == 2  # one batch per epoch: manual steps are counted too
    saved = json.loads((Path(record_dir(group_overrides, method)) / "metrics.json").read_text())
    assert saved["metrics"]["test/test/worst_group_acc"] == m["test/test/worst_group_acc"]
    assert m["params/trainable"] < 1000  # model.trainable=none: the linear head only


def record_dir(overrides: list[str], method: str) -> str:
    log_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("paths.log_dir="))
    return f"{log_dir}/dev.none.{method}.group_shapes/seed1"


def test_group_method_on_data_without_groups_fails_through_the_runner(tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_clip",
            "data=shapes",
            "method=groupdro",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
        ]
    )
    with pytest.raises(TaskInfoError, match=r"method=groupdro needs 'num_groups'.*data=shapes"):
        run(cfg)
    assert not list(tmp_path.glob("**/metrics.json"))
