"""The SCER method (reprolab.methods.group.scer; spec robustness_ood_prompting.md §1.2-§1.3).

SCER is GroupDRO plus L_emb on the featurizer output: with λ_sp = λ_core = 0 its steps are
GroupDRO's bit for bit; with the defaults one plain SGD step differs from GroupDRO's by exactly
−lr ∇L_emb in the featurizer and not at all in the head (β in closed form); a batch missing a group
reuses the previous L_emb detached (0 before the first full batch); the group layout, a frozen
featurizer and data without groups fail when the method is built; and the runner trains it on
`group_synth` with the MLP featurizer.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from _group_helpers import BatchData, Featurizer, fit_batches, toy_info
from torch import nn

from reprolab.data.info import TaskInfoError
from reprolab.errors import ConfigValueError
from reprolab.methods.group.groupdro import GroupDRO
from reprolab.methods.group.scer import SCER
from reprolab.methods.group.scer_math import scer_embedding_loss

LOG_WARNING = "ignore:You are trying to `self.log\\(\\)`"


FULL = [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3]  # all four groups, minorities 1 and 2
MISSING = [0, 0, 0, 0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]  # G1 = (y0, a1) absent


def _batch(groups: list[int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups_t = torch.tensor(groups)[torch.randperm(len(groups), generator=g)]
    x = torch.randn(len(groups), 3, generator=g) + groups_t[:, None].float() * 0.3
    return {"image": x, "label": groups_t // 2, "group": groups_t}


def _fit(method, batches: list[dict], seed: int = 0) -> L.Trainer:
    if method.head is None:
        torch.manual_seed(seed)
        method.head = method.build_head("random")
    return fit_batches(method, BatchData(batches))


SGD_MOM = functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9, weight_decay=1e-3)
SGD_PLAIN = functools.partial(torch.optim.SGD, lr=0.5)


def _pair(net: nn.Module, optimizer=SGD_MOM, **scer_kw) -> tuple[GroupDRO, SCER]:
    dro = GroupDRO(
        name="groupdro", model=copy.deepcopy(net), info=toy_info(4), eta=0.5, optimizer=optimizer
    )
    scer = SCER(
        name="scer",
        model=copy.deepcopy(net),
        info=toy_info(4),
        eta=0.5,
        optimizer=optimizer,
        **scer_kw,
    )
    return dro, scer


def _params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_zero_lambdas_give_groupdro_steps_exactly() -> None:
    torch.manual_seed(0)
    batches = [_batch(FULL, 1), _batch(MISSING, 2), _batch(FULL, 3), _batch(FULL, 4)]
    dro, scer = _pair(Featurizer(), lambda_spurious=0.0, lambda_core=0.0)
    _fit(dro, batches)
    _fit(scer, batches)
    pa, pb = _params(dro), _params(scer)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert torch.equal(dro.dro.q, scer.dro.q)
    assert not torch.allclose(dro.dro.q, torch.full((4,), 0.25))  # q moved
    assert float(scer.prev_l_emb) == 0.0  # 0·|s| − 0·c


def test_embedding_loss_gradient_reaches_the_featurizer_and_not_the_closed_form_head() -> None:
    torch.manual_seed(1)
    net = Featurizer()
    batch = _batch(FULL, 5)
    dro, scer = _pair(net, optimizer=SGD_PLAIN)
    _fit(dro, [batch])
    _fit(scer, [batch])
    # the gradient of L_emb alone at the initial weights, computed independently
    ref = copy.deepcopy(net)
    out = scer_embedding_loss(
        ref.encode_image(batch["image"]), batch["label"], batch["group"] % 2, 1.0, 1.0
    )
    assert out is not None
    grads = torch.autograd.grad(out[0], list(ref.parameters()))
    pa, pb = _params(dro), _params(scer)
    for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
        key = f"backbone.{name}"
        assert float(g.abs().max()) > 1e-4, name  # L_emb does reach every featurizer tensor
        torch.testing.assert_close(pb[key] - pa[key], -0.5 * g, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(pa["backbone.net.0.weight"], pb["backbone.net.0.weight"])
    # β in closed form: the head's gradient is L_dro's only, the same as GroupDRO's
    assert torch.equal(pa["head.weight"], pb["head.weight"])
    assert torch.equal(pa["head.bias"], pb["head.bias"])
    torch.testing.assert_close(scer.prev_l_emb, out[0].detach())

    # β from the head (the ablation): L_emb trains the head too
    _, head = _pair(net, optimizer=SGD_PLAIN, beta_source="head")
    _fit(head, [batch])
    assert not torch.allclose(_params(head)["head.weight"], pa["head.weight"])


@pytest.mark.filterwarnings(LOG_WARNING)
def test_a_batch_missing_a_group_reuses_the_previous_embedding_loss_detached() -> None:
    torch.manual_seed(2)
    net = Featurizer()
    full, missing = _batch(FULL, 6), _batch(MISSING, 7)

    # no full batch yet: L_emb = 0 and the steps are GroupDRO's
    dro, scer = _pair(net)
    _fit(dro, [missing, _batch(MISSING, 8)])
    _fit(scer, [missing, _batch(MISSING, 8)])
    assert float(scer.prev_l_emb) == 0.0
    for k, v in _params(dro).items():
        assert torch.equal(v, _params(scer)[k]), k

    # after a full batch: its value comes back, detached, and adds no gradient
    dro, scer = _pair(net)
    torch.manual_seed(0)
    dro.head = dro.build_head("random")
    torch.manual_seed(0)
    scer.head = scer.build_head("random")
    h = scer.image_features(full["image"])
    first = scer.embedding_loss(h, full["group"])
    assert first.requires_grad and float(first.detach()) != 0.0
    reused = scer.embedding_loss(scer.image_features(missing["image"]), missing["group"])
    assert not reused.requires_grad and reused.grad_fn is None
    assert float(reused) == float(first.detach())

    loss_scer = scer.training_step(missing, 0)
    loss_dro = dro.training_step(missing, 0)
    assert float((loss_scer - loss_dro).detach()) == pytest.approx(float(first.detach()), rel=1e-6)
    loss_scer.backward()
    loss_dro.backward()
    for (k, p), q in zip(scer.named_parameters(), dro.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), k  # the reused L_emb contributes no gradient
    assert float(scer.prev_l_emb) == float(first.detach())  # kept for the next missing batch


@pytest.mark.filterwarnings(LOG_WARNING)
def test_multinli_layout_groups_beyond_binary_y_are_in_l_dro_only() -> None:
    """3 classes × 2 attributes (6 groups): groups 4, 5 enter L_dro (and q) but not Δ, Δ0, a0."""
    torch.manual_seed(3)
    m = SCER(name="scer", model=Featurizer(), info=toy_info(6, classes=3), optimizer=SGD_PLAIN)
    torch.manual_seed(0)
    m.head = m.build_head("random")
    batch = _batch([*FULL, 4, 4, 5, 5, 5], 9)
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert (m.dro.q[4:] != 1.0 / 6).all()  # L_dro updated the groups beyond binary y
    h = m.image_features(batch["image"])
    ref = scer_embedding_loss(h, batch["label"], batch["group"] % 2, 1.0, 1.0)
    torch.testing.assert_close(m.prev_l_emb, ref[0].detach())


def test_build_time_errors_are_one_line() -> None:
    with pytest.raises(TaskInfoError) as e:  # data without groups
        SCER(name="scer", model=Featurizer(), info=toy_info(None), optimizer=SGD_PLAIN)
    assert (
        "\n" not in str(e.value) and "'num_groups'" in str(e.value) and "data=toy" in str(e.value)
    )
    cases = [
        ({"info": toy_info(3)}, r"has 3 groups"),  # not 2·y + a
        ({"info": toy_info(8)}, r"4 groups for 2 classes"),
        ({"info": toy_info(6, classes=3), "beta_source": "head"}, r"beta_source=closed_form"),
        ({"info": toy_info(4), "beta_source": "learned"}, r"beta_source must be one of"),
        ({"info": toy_info(4), "model": Featurizer("none")}, r"model.trainable=image"),
    ]
    for kw, pattern in cases:
        kw = {"model": Featurizer(), "optimizer": SGD_PLAIN, **kw}
        with pytest.raises(ConfigValueError, match=pattern) as e:
            SCER(name="scer", **kw)
        assert "\n" not in str(e.value)
    # a frozen featurizer is fine when β comes from the (trained) head
    SCER(
        name="scer",
        model=Featurizer("none"),
        info=toy_info(4),
        beta_source="head",
        optimizer=SGD_PLAIN,
    )


@pytest.mark.filterwarnings(LOG_WARNING)
def test_groups_that_are_not_two_y_plus_a_fail_in_one_line() -> None:
    m = SCER(name="scer", model=Featurizer(), info=toy_info(4), optimizer=SGD_PLAIN)
    m.head = m.build_head("random")
    batch = _batch(FULL, 10)
    batch["label"] = 1 - batch["label"]
    with pytest.raises(ConfigValueError, match=r"not 2·label \+ attribute") as e:
        m.training_step(batch, 0)
    assert "\n" not in str(e.value)


def test_scer_on_data_without_groups_fails_through_the_runner(tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        ["model=tiny_clip", "data=shapes", "method=scer", "logger=csv", f"paths.log_dir={tmp_path}"]
    )
    with pytest.raises(TaskInfoError, match=r"method=scer needs 'num_groups'.*data=shapes"):
        run(cfg)


def test_runs_end_to_end_on_group_synth_with_the_mlp_featurizer(tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "method=scer",
            "data=group_synth",
            "model=mlp_featurizer",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "++trainer.limit_train_batches=6",
            "trainer.log_every_n_steps=1",
            "data.val=false",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
            "progress_bar=false",
            "threads=1",
        ]
    )
    record = run(cfg)
    assert record["global_step"] == 6
    run_dir = tmp_path / "dev.none.scer.group_synth" / "seed1"
    saved = json.loads((run_dir / "metrics.json").read_text())
    wga = saved["metrics"]["test/test/worst_group_acc"]
    assert 0.0 <= wga <= saved["metrics"]["test/test/avg_group_acc"] <= 100.0
    assert wga == record["metrics"]["test/test/worst_group_acc"]
    # per-group accuracies and their mean weighted by the train shares (47.5 / 2.5 / 2.5 / 47.5 %)
    m = saved["metrics"]
    per_group = [m[f"test/test/group{g}_acc"] for g in range(4)]
    assert min(per_group) == pytest.approx(wga)
    shares = [0.475, 0.025, 0.025, 0.475]
    want = sum(p * a for p, a in zip(shares, per_group, strict=True))
    assert m["test/test/acc_weighted"] == pytest.approx(want, abs=0.01)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for key in ("train/scer_s", "train/scer_c", "train/scer_a0", "train/l_emb", "train/l_dro"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(v == v for v in values), key  # logged, finite
    a0 = [float(r["train/scer_a0"]) for r in rows if r.get("train/scer_a0")]
    assert all(0.0 < v < 0.5 for v in a0)  # ½[P(a=1|y=1)P(y=1) + P(a=0|y=0)P(y=0)] < ½


@pytest.mark.filterwarnings(LOG_WARNING)
def test_alignment_diagnostic_logs_scer_s_and_c_of_the_id_test_features() -> None:
    from reprolab.data.info import ImageClassificationInfo, TestSet
    from reprolab.methods.group.erm import ERM

    info = ImageClassificationInfo(
        name="toy",
        classnames=("a", "b"),
        templates=("{}",),
        num_groups=4,
        test_sets=(TestSet("test", "id"),),
    )
    torch.manual_seed(0)
    m = ERM(name="erm", model=Featurizer(), info=info, optimizer=SGD_PLAIN, alignment=True)
    m.head = m.build_head("random")
    batches = [_batch(FULL * 4, s) for s in (1, 2)]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    out = trainer.test(m, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))[0]
    with torch.no_grad():
        h = torch.cat([m.backbone.encode_image(b["image"]) for b in batches]).double()
    g = torch.cat([b["group"] for b in batches])
    _, diag = scer_embedding_loss(h, g // 2, g % 2, 1.0, 1.0)
    assert out["test/scer_abs_s"] == pytest.approx(abs(float(diag["s"])), rel=1e-5)
    assert out["test/scer_c"] == pytest.approx(float(diag["c"]), rel=1e-5)
    # defined for 2 classes x 2 attributes only: anything else fails when built, in one line
    with pytest.raises(ConfigValueError, match=r"alignment=true.*3 classes and 6 groups") as e:
        ERM(
            name="erm",
            model=Featurizer(),
            info=toy_info(6, classes=3),
            optimizer=SGD_PLAIN,
            alignment=True,
        )
    assert "\n" not in str(e.value)
