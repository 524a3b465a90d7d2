"""OOD metrics (both FPR95 forms) and the post-hoc OOD scorers behind the query-only oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from reprolab.metrics.ood import OOD_KEYS, fpr_at_ood_detection, ood_metrics


def upstream_fpr_at(scores: list[float], targets: list[int], rate: float) -> float:
    """`calculate_fpr_at` of hy18284/mixdiff (mixup/utils.py), re-typed from its description:
    scores are OOD-ness, targets 1 = OOD; threshold at the k-th most OOD sample, k = round(n r)."""
    ood = sorted((s for s, t in zip(scores, targets, strict=True) if t == 1), reverse=True)
    ind = np.array([s for s, t in zip(scores, targets, strict=True) if t == 0])
    threshold = ood[round(len(ood) * rate) - 1]
    return float(np.sum(ind > threshold) / len(ind))


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_against_sklearn_and_the_upstream_fpr() -> None:
    g = torch.Generator().manual_seed(3)
    id_s, ood_s = torch.randn(500, generator=g) + 1.2, torch.randn(333, generator=g)
    out = ood_metrics(id_s, ood_s)
    assert set(out) == set(OOD_KEYS) == {"auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out"}
    y = np.r_[np.ones(500), np.zeros(333)]
    s = torch.cat([id_s, ood_s]).double().numpy()
    assert out["auroc"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-4)
    assert out["aupr_in"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-4)
    assert out["aupr_out"] == pytest.approx(100 * average_precision_score(1 - y, -s), abs=1e-4)
    fpr, tpr, _ = roc_curve(y, s)
    assert out["fpr95"] == pytest.approx(100 * fpr[tpr >= 0.95].min(), abs=1e-4)
    # The mirror form: OOD positive with OOD-ness -s; without ties it is sklearn's FPR at the first
    # threshold where the OOD recall reaches k / n_ood, k = round(0.95 n_ood) = 316 of 333.
    fpr_o, tpr_o, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    k = round(333 * 0.95)
    ref = fpr_o[np.argmax(tpr_o >= k / 333 - 1e-12)]
    assert out["fpr95_oodpos"] == pytest.approx(100 * ref, abs=1e-4)
    upstream = upstream_fpr_at((-s).tolist(), (1 - y).astype(int).tolist(), 0.95)
    assert out["fpr95_oodpos"] == pytest.approx(100 * upstream, abs=1e-9)
    assert out["fpr95_oodpos"] != pytest.approx(out["fpr95"], abs=1.0)  # two different numbers


def test_fpr95_variants_on_hand_cases() -> None:
    # 20 OOD scores 0..19 (higher = ID) and four ID scores. Mirror form: k = round(19.0) = 19, the
    # threshold is the 19th most OOD score, 18; the ID samples strictly below it: 17.5 -> 1 of 4.
    ood = torch.arange(20.0)
    ind = torch.tensor([17.5, 18.0, 18.5, 30.0])
    assert fpr_at_ood_detection(ind, ood) == 0.25
    # Standard form: keeping 95% of 4 ID samples keeps all of them (threshold 17.5): OOD 18, 19
    # are accepted, 2 of 20.
    out = ood_metrics(ind, ood)
    assert out["fpr95"] == pytest.approx(10.0) and out["fpr95_oodpos"] == pytest.approx(25.0)
    # Python's round, as upstream: 10 OOD -> round(9.5) = 10 (the least OOD one, score 9).
    assert fpr_at_ood_detection(torch.tensor([8.5, 9.5]), torch.arange(10.0)) == 0.5
    # Ties at the threshold are not counted (strict): ID at the threshold score is kept.
    assert fpr_at_ood_detection(torch.tensor([18.0, 18.0]), ood) == 0.0
    perfect = ood_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0]))
    assert perfect["fpr95_oodpos"] == 0.0 and perfect["auroc"] == 100.0


# -- the scores --------------------------------------------------------------------------------
def test_each_score_against_a_hand_computation() -> None:
    from reprolab.methods.ood.scores import oodness

    o = [4.0, 1.0, -2.0]
    z = torch.tensor([o])
    ex = [math.exp(v) for v in o]
    p = [e / sum(ex) for e in ex]
    s, t = 100.0, 0.5
    assert oodness("msp", z, "logits").item() == pytest.approx(-max(p), rel=1e-6)
    assert oodness("msp", torch.tensor([p]), "probs").item() == pytest.approx(-max(p), rel=1e-6)
    assert oodness("maxlogit", z, "logits").item() == -4.0
    lse = math.log(sum(ex))
    assert oodness("energy", z, "logits", logit_scale=s).item() == pytest.approx(-lse / s, rel=1e-6)
    h = -sum(q * math.log(q) for q in p)
    assert oodness("entropy", z, "logits").item() == pytest.approx(h, rel=1e-6)
    assert oodness("entropy", torch.tensor([p]), "probs").item() == pytest.approx(h, rel=1e-6)
    assert oodness("entropy", torch.tensor([[1.0, 0.0, 0.0]]), "probs").item() == 0.0  # 0 log 0
    e2 = [math.exp(v / s / t) for v in o]
    mcm = max(e2) / sum(e2)
    assert oodness("mcm", z, "logits", s, t).item() == pytest.approx(-mcm, rel=1e-6)
    assert oodness("onehot", torch.tensor([[0.0, 1.0, 0.0]]), "label").item() == 0.0


def test_a_score_that_cannot_read_the_output_is_refused_in_one_line() -> None:
    from reprolab.errors import ConfigValueError
    from reprolab.methods.ood.scores import check_score

    with pytest.raises(ConfigValueError, match="score energy reads embedding/logits") as e:
        check_score("energy", "energy", "probs", ("energy",))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigValueError, match="Unknown score 'msb'.*did you mean 'msp'"):
        check_score("msp", "msb", "logits", ("msp", "energy"))
    check_score("msp", "msp", "probs", ("msp",))  # fine


# -- the oracle's access settings ---------------------------------------------------------------
def test_blackbox_access_settings_answer_what_they_name() -> None:
    from reprolab.errors import ConfigValueError
    from reprolab.models.blackbox import BlackBox

    class Clip(torch.nn.Module):
        logit_scale = 20.0

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(12, 5)

        def encode_image(self, x):  # (B, 3, 2, 2) -> (B, 5)
            return self.proj(x.flatten(1))

        def zeroshot_weights(self, classnames, templates):  # (C, 5)
            return torch.eye(5)[: len(classnames)] + 0.1

    model, names = Clip(), ["a", "b", "c"]
    x = torch.randn(7, 3, 2, 2)
    logits = BlackBox(model, names, ["{}"])(x)
    w = F.normalize(torch.eye(5)[:3] + 0.1, dim=-1)
    emb = F.normalize(model.encode_image(x).detach(), dim=-1)
    torch.testing.assert_close(logits, 20.0 * emb @ w.T)
    probs = BlackBox(model, names, ["{}"], output="probs")(x)
    torch.testing.assert_close(probs, logits.softmax(-1))
    label = BlackBox(model, names, ["{}"], output="label")(x)
    assert torch.equal(label, F.one_hot(logits.argmax(-1), 3).float())
    bb = BlackBox(model, names, ["{}"], output="embedding")
    z = bb(x, phase="test")
    torch.testing.assert_close(z, emb)
    mixed = 0.3 * z[:4] + 0.7 * z[3:]  # the head does not renormalise a mix
    torch.testing.assert_close(bb.head(mixed), 20.0 * mixed @ w.T)
    assert bb.head_evals["test"] == 4 and bb.eval_counts["test"]["images"] == 7
    assert bb.output == "embedding" and bb.logit_scale == 20.0 and "output=embedding" in repr(bb)
    # A plain classifier: any input shape, C known after its first answer, logit scale 1.
    clf = torch.nn.Linear(2, 4)
    cb = BlackBox(clf, None, output="probs")
    assert cb.num_classes is None and cb.logit_scale == 1.0
    torch.testing.assert_close(cb(torch.ones(3, 2)), clf(torch.ones(3, 2)).detach().softmax(-1))
    assert cb.num_classes == 4
    with pytest.raises(ConfigValueError, match="output=embedding needs a CLIP-like target"):
        BlackBox(clf, None, output="embedding")
    with pytest.raises(ConfigValueError, match="unknown output 'prob'"):
        BlackBox(model, names, ["{}"], output="prob")  # type: ignore[arg-type]


# -- the methods through the oracle ------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_ood():
    from reprolab.data.datamodule import ClassificationDataModule

    return ClassificationDataModule(
        "shapes_ood", "shapes", dataset_kwargs={"ood": True}, eval_batch_size=40, val=False
    )


@pytest.fixture(scope="module")
def tiny():
    from reprolab.models.clip import CLIPBackbone

    torch.manual_seed(0)
    return CLIPBackbone("tiny", "reprolab-tiny-clip", pretrained=None)


def test_method_scores_are_the_negated_score_of_the_oracle_answers(shapes_ood, tiny) -> None:
    from reprolab.methods.ood.scores import UPSTREAM_TEMPLATE, PostHocOOD

    torch.manual_seed(1)
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        w = F.normalize(
            tiny.zeroshot_weights(list(shapes_ood.info.classnames), [UPSTREAM_TEMPLATE])
        )
        ref = tiny.logit_scale * F.normalize(tiny.encode_image(x), dim=-1) @ w.T  # (6, C)
    for score, output in [
        ("msp", "logits"),
        ("msp", "probs"),
        ("energy", "logits"),
        ("entropy", "probs"),
        ("maxlogit", "embedding"),
        ("mcm", "logits"),
    ]:
        m = PostHocOOD(
            name=score,
            model=tiny,
            info=shapes_ood.info,
            score=score,
            output=output,
            temperature=0.5,
        )
        logits = m.logits(x)
        scores = m.ood_scores(logits, x)
        probs = ref.softmax(-1)
        expected = {
            "msp": probs.max(-1).values,
            "energy": torch.logsumexp(ref, -1) / tiny.logit_scale,
            "entropy": -(probs * probs.log()).sum(-1),
            "maxlogit": ref.max(-1).values,
            "mcm": (ref / tiny.logit_scale / 0.5).softmax(-1).max(-1).values,
        }[score]
        sign = -1.0 if score == "entropy" else 1.0  # entropy: higher = OOD, so negated
        torch.testing.assert_close(scores, sign * expected, rtol=1e-4, atol=1e-5)
        assert m.oracle.eval_counts["test"]["images"] == 6  # one query per image, reused
        assert list(m.parameters()) == [] and not hasattr(m, "backbone")
    # probs: the classification logits are log-probabilities (softmax gives the probabilities back)
    m = PostHocOOD(name="msp", model=tiny, info=shapes_ood.info, output="probs")
    torch.testing.assert_close(m.logits(x).softmax(-1), ref.softmax(-1), rtol=1e-4, atol=1e-6)


def test_data_without_an_ood_set_fails_at_build_time_in_one_line(tiny) -> None:
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.data.info import TaskInfoError
    from reprolab.methods.ood.mixdiff import MixDiff
    from reprolab.methods.ood.scores import PostHocOOD

    dm = ClassificationDataModule("shapes", "shapes", val=False)
    for cls in (PostHocOOD, MixDiff):
        with pytest.raises(TaskInfoError, match="data=shapes_ood") as e:
            cls(name="m", model=tiny, info=dm.info)
        assert "\n" not in str(e.value) and "has none" in str(e.value)


@pytest.mark.parametrize("method", ["msp", "maxlogit", "energy", "entropy_ood", "mcm"])
def test_tiny_clip_smoke_run_on_shapes_ood(method: str, tmp_path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            f"method={method}",
            "model=tiny_clip",
            "data=shapes_ood",
            "trainer=cpu",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
            "progress_bar=false",
            "threads=1",
            "data.eval_batch_size=40",
            "++trainer.limit_test_batches=1",
        ]
    )
    assert cfg.method.post_hoc  # test only: nothing trains
    m = run(cfg)["metrics"]
    for key in OOD_KEYS:
        assert -1e-3 <= m[f"test/ood_digits/{key}"] <= 100.0 + 1e-3  # torchmetrics: float32
    assert m["test/acc"] > 50.0  # the pretrained tiny CLIP classifies shapes
    assert m["test/images"] == 120  # id, shift, ood: one query per image
    if method in ("maxlogit", "energy"):
        assert m["test/ood_digits/auroc"] > 90.0  # far OOD: digits (full sets: 99.9 vs MSP 76)
