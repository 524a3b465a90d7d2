"""NPC's classifier baselines (robustness_ood_prompting.md §4.5; `reprolab.methods.noisy`) and the
networks they train (`reprolab.models.cnn`): each loss against a hand computation on small tensors,
Co-teaching's selection and schedules, Forward's transition estimate, the interface a post-processor
reads (`logits`, `embed`, a run dir it can rebuild the classifier from), and the §4.5 miniature: CE
trained to convergence on `noisy_blobs` (40 % symmetric noise) memorises the noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.data.noisy import NoisyBlobsDataModule
from reprolab.errors import ConfigValueError
from reprolab.methods.noisy.coteaching import (
    CoTeaching,
    coteaching_loss,
    forget_rate_schedule,
    lr_beta1,
)
from reprolab.methods.noisy.forward import Forward, estimate_transition, forward_loss
from reprolab.methods.noisy.label_smoothing import label_smoothing_loss
from reprolab.methods.noisy.sce import SCE, sce_loss
from reprolab.models.cnn import CNN9, CNNMNIST
from reprolab.models.mlp import MLPFeaturizer
from reprolab.train import run
from reprolab.utils.config import compose_train

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [-30.0, 30.0, 0.0]])
LABELS = torch.tensor([0, 2, 0])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Losses against hand computations


def test_label_smoothing_is_upstreams_formula():
    p = softmax(LOGITS.numpy().astype(np.float64))
    y = LABELS.numpy()
    ce = -np.log(p[np.arange(3), y]).mean()
    smooth = -np.log(p).mean()  # -torch.mean(log_softmax) over batch and classes
    want = 0.9 * ce + 0.1 * smooth
    assert float(label_smoothing_loss(LOGITS, LABELS, 0.1)) == pytest.approx(want, rel=1e-5)
    # = CE against (1 - α)·onehot + α/K
    assert float(F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1)) == pytest.approx(
        want, rel=1e-5
    )
    assert float(label_smoothing_loss(LOGITS, LABELS, 0.0)) == pytest.approx(ce, rel=1e-5)


def test_sce_rce_reads_log_zero_as_log_1e_4():
    z = LOGITS.numpy().astype(np.float64)
    p = np.clip(softmax(z), 1e-7, 1.0)  # sample 3: p_0 ~ 1e-26, clamped to 1e-7
    y = LABELS.numpy()
    ce = -np.log(softmax(z)[np.arange(3), y]).mean()
    a = math.log(1e-4)
    rce = np.array([-a * (p[i].sum() - p[i, y[i]]) for i in range(3)])  # -Σ_k p_k log q_k
    got = float(sce_loss(LOGITS, LABELS, 0.1, 1.0, "sum"))
    assert got == pytest.approx(0.1 * ce + rce.mean(), rel=1e-5)
    assert float(sce_loss(LOGITS, LABELS, 0.1, 1.0, "mean")) == pytest.approx(
        0.1 * ce + rce.mean() / 3, rel=1e-5
    )
    assert rce[2] == pytest.approx(-a * (1.0 + 1e-7 - 1e-7), rel=1e-6)  # confidently wrong: the cap
    assert float(sce_loss(LOGITS, LABELS, 1.0, 0.0)) == pytest.approx(ce, rel=1e-5)


def test_forward_loss_is_the_nll_of_the_pushed_forward_posterior():
    t = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.8, 0.0], [0.0, 0.5, 0.5]])
    p = softmax(LOGITS.numpy().astype(np.float64))
    q = p @ t.numpy()  # p(ỹ = j | x) = Σ_i p(y = i | x) T[i, j]
    y = LABELS.numpy()
    want = -np.log(np.clip(q[np.arange(3), y], 1e-6, 1 - 1e-6)).mean()
    assert float(forward_loss(LOGITS, LABELS, t)) == pytest.approx(want, rel=1e-5)
    eye = torch.eye(3)
    ce = F.cross_entropy(LOGITS[:2], LABELS[:2])  # no clamp reached for these two
    assert float(forward_loss(LOGITS[:2], LABELS[:2], eye)) == pytest.approx(float(ce), rel=1e-5)


def test_transition_estimate_takes_the_97th_percentile_anchor_per_noisy_class():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(300, 3, generator=g).softmax(1)
    labels = torch.cat([torch.zeros(200), torch.ones(100)]).long()  # class 2: no sample
    t = estimate_transition(probs, labels, 3)
    rows0 = probs[:200]
    third = torch.sort(rows0[:, 0], descending=True).indices[int(200 * 0.03) - 1]  # rank 6
    assert torch.equal(t[0], rows0[third])
    rows1 = probs[200:]
    assert torch.equal(t[1], rows1[torch.sort(rows1[:, 1], descending=True).indices[2]])  # rank 3
    assert torch.equal(t[2], torch.eye(3)[2])
    few = estimate_transition(probs[:10], torch.zeros(10, dtype=torch.long), 3)  # int(0.3) -> 1
    assert torch.equal(few[0], probs[:10][probs[:10, 0].argmax()])


# ------------------------------------------------------------------------------------------------
# Co-teaching


def test_coteaching_exchanges_small_loss_samples():
    labels = torch.tensor([0, 1, 0, 1])
    l1 = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 4.0]])  # net 1: 3, 0 easiest
    l2 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # net 2: 0, 1 easiest
    loss1, loss2, keep1, keep2 = coteaching_loss(l1, l2, labels, forget_rate=0.5)

    def ce(z, y):  # log(1 + e^(z_other - z_y)) for two classes
        return math.log1p(math.exp(float(z[1 - y] - z[y])))

    ce1 = [ce(l1[i], int(labels[i])) for i in range(4)]  # 0.049, 0.313, 2.127, 0.018
    ce2 = [ce(l2[i], int(labels[i])) for i in range(4)]  # 0.127, 0.313, 3.049, 1.313
    assert set(keep1.tolist()) == {0, 3} and set(keep2.tolist()) == {0, 1}  # int(0.5 · 4) = 2 each
    assert float(loss1) == pytest.approx((ce1[0] + ce1[1]) / 2, rel=1e-5)  # net 1 on net 2's pick
    assert float(loss2) == pytest.approx((ce2[0] + ce2[3]) / 2, rel=1e-5)
    _, _, k, _ = coteaching_loss(l1[:1], l2[:1], labels[:1], forget_rate=0.5)
    assert len(k) == 1  # int(0.5 · 1) = 0 would be an empty (NaN) loss upstream


def test_coteaching_schedules_match_upstream():
    s = forget_rate_schedule(0.4, 200, 10)
    assert np.allclose(s[:10], np.linspace(0, 0.4, 10)) and np.all(s[10:] == 0.4) and len(s) == 200
    assert lr_beta1(79, 200, 1e-3, 80) == (1e-3, 0.9)
    assert lr_beta1(80, 200, 1e-3, 80) == (pytest.approx(1e-3), 0.1)
    assert lr_beta1(199, 200, 1e-3, 80) == (pytest.approx(1e-3 / 120), 0.1)


def _blobs_info():
    return NoisyBlobsDataModule("noisy_blobs", n_train=30, n_test=30).info


def test_coteaching_second_network_is_a_fresh_init_and_selection_is_in_the_state():
    torch.manual_seed(0)
    m = CoTeaching(name="coteaching", model=MLPFeaturizer("mlp", input_dim=16), info=_blobs_info())
    w1, w2 = m.backbone.net[0].weight, m.backbone2.net[0].weight
    assert w1.shape == w2.shape and not torch.equal(w1, w2)
    x = torch.randn(5, 16)
    assert torch.equal(m.logits(x), m.net_logits(0, x))
    m.selected.fill_(1)
    assert torch.equal(m.logits(x), m.net_logits(1, x)) and torch.equal(
        m.embed(x), m.backbone2.encode_image(x)
    )
    assert "selected" in m.state_dict() and "backbone2.net.0.weight" in m.state_dict()


# ------------------------------------------------------------------------------------------------
# Networks and the post-processor's interface


def test_cnns_match_upstreams_sizes_and_embeddings():
    cnn = CNNMNIST()
    assert sum(p.numel() for p in cnn.parameters()) == 10_037_504  # CNN_MNIST less linear3
    x = torch.rand(4, 1, 28, 28)
    cnn.eval()
    assert torch.allclose(cnn.encode_image(x), cnn.encode_image(x.expand(-1, 3, -1, -1)), atol=1e-6)
    assert cnn.encode_image(x).shape == (4, 256) and cnn.preprocess.image_size == 28
    c9 = CNN9()
    assert sum(p.numel() for p in c9.parameters()) == 4_433_280 and c9.feature_dim == 128
    c9.eval()
    y = torch.rand(2, 3, 32, 32)
    assert torch.equal(c9(y), c9(y))  # train-only dropout by default
    c9.eval_dropout = True
    assert not torch.equal(c9(y), c9(y))  # upstream's F.dropout2d(training=True) at test time
    sce = SCE(
        name="sce",
        model=CNNMNIST(),
        info=NoisyBlobsDataModule("b", n_train=30, num_classes=10).info,
    )
    assert sce.alpha == 0.01 and sce.embed_dim == 256 and sce.head.in_features == 256


def test_backbone_logits_head_reads_the_imagenet_classifier():
    from reprolab.methods.noisy.ce import CE
    from reprolab.models.timm import TimmBackbone

    bb = TimmBackbone("r18", "resnet18", pretrained=False, trainable=True, num_classes=None)
    m = CE(name="ce_noisy", model=bb, info=_blobs_info(), head_input="backbone_logits")
    assert m.head.in_features == 1000 and m.embed_dim == 512
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.logits(x), m.head(bb.model(x)), atol=1e-5)
        assert m.embed(x).shape == (2, 512)
    with pytest.raises(ConfigValueError, match="num_classes=null"):
        CE(
            name="ce_noisy",
            model=TimmBackbone("r", "resnet18", trainable=True),
            info=_blobs_info(),
            head_input="backbone_logits",
        )


# ------------------------------------------------------------------------------------------------
# Runs on noisy_blobs


def _overrides(tmp_path, *extra: str) -> list[str]:
    return [
        "model=mlp_featurizer", "model.input_dim=12", "data=noisy_blobs", "trainer=cpu", "logger=none",
        f"paths.log_dir={tmp_path}", "progress_bar=false", "threads=1", *extra,
    ]  # fmt: skip


def _rebuild(run_dir):
    """The classifier of a finished run, from its config.yaml and last.ckpt (as NPC rebuilds it)."""
    import hydra
    from omegaconf import OmegaConf

    import reprolab  # noqa: F401  (resolvers)

    saved = OmegaConf.load(run_dir / "config.yaml")
    dm = hydra.utils.instantiate(saved.data)
    model = hydra.utils.instantiate(saved.model)
    clf = hydra.utils.instantiate(saved.method, _convert_="all")(model=model, info=dm.info)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    clf.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    return clf.eval(), dm


def _memorises(tmp_path, seed: int, *extra: str):
    """Train ce_noisy on noisy_blobs; check the fit (the final network, in eval mode) on the noisy
    and the clean training labels and the clean test accuracy."""
    cfg = compose_train(_overrides(tmp_path, "method=ce_noisy", f"seed={seed}", *extra))
    m = run(cfg)["metrics"]
    clf, dm = _rebuild(tmp_path / cfg.cell / f"seed{seed}")
    train = dm.split_tensors("train")
    with torch.no_grad():
        pred = clf.logits(train["image"]).argmax(1)
    fit_noisy = 100.0 * float((pred == train["label"]).float().mean())
    fit_clean = 100.0 * float((pred == train["clean_label"]).float().mean())
    # §4.5: the noisy labels are fitted, the clean ones are not (Bayes accuracy ~100 %).
    assert fit_noisy > 95.0 and fit_clean < 75.0 and m["test/acc"] < 80.0, (seed, fit_noisy, m)
    return m, clf, dm


def test_ce_memorises_40_percent_noise_and_the_run_rebuilds(tmp_path):
    """§4.5: an MLP trained to convergence on 40 % symmetric noise fits the noisy labels and its clean
    test accuracy falls below 80 %. The run dir rebuilds the classifier (config.yaml + last.ckpt)
    with the run's test accuracy and an `embed` (what NPC reads)."""
    # Adam 1e-2 x 80 epochs: the outcome of upstream's 1e-3 x 200 (test_..._at_3_seeds) in 40 %
    # of the steps.
    m, clf, dm = _memorises(tmp_path, 1, "trainer.max_epochs=80", "method.optimizer.lr=1e-2")
    test = dm.split_tensors("test")
    with torch.no_grad():
        acc = 100.0 * float((clf.logits(test["image"]).argmax(1) == test["label"]).float().mean())
        emb = clf.embed(test["image"][:4])
    assert acc == pytest.approx(m["test/acc"], abs=1e-3)
    assert emb.shape == (4, clf.embed_dim) == (4, 16)
    assert m["train/acc_noisy"] > m["train/acc_clean"]  # the last epoch's running accuracies


@pytest.mark.slow
def test_ce_memorises_40_percent_noise_at_3_seeds(tmp_path):
    """The same with upstream's optimisation (Adam 1e-3, 200 epochs, batch 32) at seeds 1-3."""
    for seed in (1, 2, 3):
        _memorises(tmp_path, seed, "trainer.max_epochs=200")


def test_each_baseline_trains_on_noisy_blobs(tmp_path):
    out = {}
    for method, extra in (
        ("coteaching", ["method.lr_decay_start=null"]),
        ("forward", []),
        ("sce", []),
        ("label_smoothing", []),
        ("ce_early", ["data.val=true", "trainer.max_epochs=30"]),
    ):
        rec = run(
            compose_train(_overrides(tmp_path, f"method={method}", "trainer.max_epochs=4", *extra))
        )
        out[method] = rec["metrics"]
        assert 0 < rec["metrics"]["test/acc"] <= 100 and "train/acc_noisy" in rec["metrics"], method
    co = out["coteaching"]
    assert co["train/selected_net"] == 1 + float(co["test/net2_acc"] > co["test/net1_acc"])
    assert co["test/acc"] == pytest.approx(max(co["test/net1_acc"], co["test/net2_acc"]), abs=1e-3)
    assert 1 <= out["ce_early"]["train/early_stop_epoch"] < 30  # stopped at the first drop
    with pytest.raises(ConfigValueError, match="data.val=true"):
        run(compose_train(_overrides(tmp_path / "x", "method=ce_early", "trainer.max_epochs=2")))


def test_forward_uses_the_known_transition_or_its_estimate(tmp_path):
    dm = NoisyBlobsDataModule("noisy_blobs", n_train=60, n_test=30, dim=16, noise_rate=0.4)
    seen = []

    class Spy(Forward):
        def on_train_epoch_start(self) -> None:
            super().on_train_epoch_start()
            seen.append(self.transition.clone())

    import lightning as L

    torch.manual_seed(0)
    for mode in ("known", "estimated"):
        seen.clear()
        m = Spy(name="forward", model=MLPFeaturizer("mlp", input_dim=16), info=dm.info, transition=mode,
                optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))  # fmt: skip
        dm.configure(preprocess=m.data_requirements()["preprocess"])
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(m, datamodule=dm)  # fmt: skip
        if mode == "known":
            assert all(
                torch.allclose(t, torch.as_tensor(dm.transition, dtype=torch.float32)) for t in seen
            )
        else:
            assert torch.equal(seen[0], torch.eye(3))  # the CE warm-up epoch
            assert not torch.equal(seen[1], torch.eye(3)) and torch.allclose(
                seen[1].sum(1), torch.ones(3)
            )
    idnx = NoisyBlobsDataModule(
        "b", n_train=60, n_test=30, dim=16, noise_type="idnx", noise_rate=0.3
    )
    m = Forward(name="forward", model=MLPFeaturizer("mlp", input_dim=16), info=idnx.info, transition="known",
                optimizer=lambda p: torch.optim.Adam(p))  # fmt: skip
    idnx.configure(preprocess=m.data_requirements()["preprocess"])
    with pytest.raises(ConfigValueError, match="transition=estimated"):
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(m, datamodule=idnx)  # fmt: skip
