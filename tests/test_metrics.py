"""Every metric of reprolab.metrics against an independent computation (numpy, scikit-learn, by
hand), and the zero-shot head against a direct computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.metrics.calibration import ECE_BINS, ECE_BINS_ROBUST_FT, expected_calibration_error
from reprolab.metrics.classification import (
    BrierScore,
    NegativeLogLikelihood,
    top1_accuracy,
)
from reprolab.metrics.group import GroupAccuracy, group_accuracies
from reprolab.metrics.likelihood import TokenNLL, bits_per_dim, perplexity
from reprolab.metrics.ood import ScoreCollector, ood_metrics
from reprolab.metrics.retrieval import recall_at_k


def test_ece_hand_computed() -> None:
    # Two bins of width 0.5. Confidences 0.9, 0.8 (bin 2), 0.6 (bin 2), 0.4 can't occur for 2 classes
    # (max prob >= 0.5), so use probabilities directly as log-probs.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # confidences: .9 (correct), .8 (wrong), .6 (correct), .7 (correct); all in bin (0.5, 1.0]
    # bin acc = 3/4, bin conf = (0.9+0.8+0.6+0.7)/4 = 0.75 -> ECE = |0.75-0.75| = 0 with 2 bins.
    assert abs(expected_calibration_error(probs.log(), labels, n_bins=2)) < 1e-6
    # With 10 bins: bins (0.5,0.6]: {.6 correct}, (0.6,0.7]: {.7 correct}, (0.7,0.8]: {.8 wrong},
    # (0.8,0.9]: {.9 correct}. ECE = 1/4(|1-.6| + |1-.7| + |0-.8| + |1-.9|) = 1/4 * 1.6 = 0.4
    assert abs(expected_calibration_error(probs.log(), labels, n_bins=10) - 0.4) < 1e-6


def test_worst_and_average_group_accuracy() -> None:
    m = GroupAccuracy(num_groups=4)  # group 3 never occurs: left out of worst and average
    preds = torch.tensor([0, 1, 1, 0, 1, 1])
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    m.update(preds[:3], labels[:3], groups[:3])  # accumulates across batches
    m.update(preds[3:], labels[3:], groups[3:])
    # group accs: g0 2/2, g1 1/2, g2 1/2 -> worst 0.5, average 2/3
    out = m.compute()
    assert float(out["worst"]) == 0.5
    assert float(out["average"]) == pytest.approx(2 / 3)
    accs = group_accuracies(preds, labels, groups, 4)
    assert accs[:3].tolist() == [1.0, 0.5, 0.5] and torch.isnan(accs[3])
    # per group (present ones only) and, once the training counts are given, weighted by them
    assert {k for k in out if k.startswith("group")} == {"group0", "group1", "group2"}
    assert [float(out[f"group{g}"]) for g in range(3)] == [1.0, 0.5, 0.5]
    assert "weighted" not in out
    m.set_weights(torch.tensor([60.0, 10.0, 20.0, 10.0]))  # g3 absent from test: renormalised
    want = (60 * 1.0 + 10 * 0.5 + 20 * 0.5) / 90
    assert float(m.compute()["weighted"]) == pytest.approx(want)
    with pytest.raises(ValueError, match="out of range"):
        m.update(preds, labels, torch.full_like(groups, 4))


def _numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs((pred[inb] == labels[inb]).mean() - conf[inb].mean())
    return ece


@pytest.mark.parametrize("n_bins", [ECE_BINS, ECE_BINS_ROBUST_FT])
def test_ece_against_numpy(n_bins: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)
    expected = _numpy_ece(logits.softmax(-1).double().numpy(), labels.numpy(), n_bins)
    assert expected_calibration_error(logits, labels, n_bins) == pytest.approx(expected, abs=1e-5)


def test_accuracy_nll_brier_against_sklearn() -> None:
    from sklearn.metrics import accuracy_score, log_loss

    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(300, 5, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    probs = logits.double().softmax(-1).numpy()
    y = labels.numpy()
    assert top1_accuracy(logits, labels) == pytest.approx(
        100 * accuracy_score(y, probs.argmax(1)), abs=1e-4
    )
    nll, brier = NegativeLogLikelihood(), BrierScore()
    for chunk in range(3):  # batched accumulation equals the whole-set mean
        sl = slice(100 * chunk, 100 * (chunk + 1))
        nll.update(logits[sl], labels[sl])
        brier.update(logits[sl], labels[sl])
    assert float(nll.compute()) == pytest.approx(log_loss(y, probs, labels=range(5)), abs=1e-5)
    onehot = np.eye(5)[y]
    assert float(brier.compute()) == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-5)


def test_ood_metrics_against_sklearn() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    g = torch.Generator().manual_seed(2)
    id_s = torch.randn(400, generator=g) + 1.0
    ood_s = torch.randn(300, generator=g)
    out = ood_metrics(id_s, ood_s)
    y = np.r_[np.ones(400), np.zeros(300)]
    s = torch.cat([id_s, ood_s]).numpy()
    assert out["auroc"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-4)
    assert out["aupr_in"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-4)
    assert out["aupr_out"] == pytest.approx(100 * average_precision_score(1 - y, -s), abs=1e-4)
    fpr, tpr, _ = roc_curve(y, s)
    assert out["fpr95"] == pytest.approx(100 * fpr[tpr >= 0.95].min(), abs=1e-4)
    # separable scores: perfect detection
    perfect = ood_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0]))
    assert perfect["auroc"] == 100.0 and perfect["fpr95"] == 0.0
    with pytest.raises(ValueError, match="both sets"):
        ood_metrics(id_s, torch.empty(0))


def test_score_collector_concatenates_batches() -> None:
    c = ScoreCollector()
    c.update(torch.tensor([1.0, 2.0]))
    c.update(torch.tensor([[3.0]]))
    assert c.compute().tolist() == [1.0, 2.0, 3.0]


def test_recall_at_k_by_hand() -> None:
    # 3 images, 5 captions; caption j belongs to image text_to_image[j].
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0],  # image 0: top-1 caption 0 (its own)
            [0.7, 0.2, 0.3, 0.1, 0.0],  # image 1: top-1 caption 0 (wrong), its caption 2 is 2nd
            [0.0, 0.0, 0.0, 0.2, 0.1],  # image 2: top-1 caption 3 (its own)
        ]
    )
    out = recall_at_k(sim, text_to_image, ks=(1, 2))
    assert out["i2t_r@1"] == pytest.approx(100 * 2 / 3)
    assert out["i2t_r@2"] == pytest.approx(100.0)
    # captions' top image: c0 -> 0 ok, c1 -> 1 (wrong), c2 -> 0 (wrong), c3 -> 2 ok, c4 -> 2 ok
    assert out["t2i_r@1"] == pytest.approx(100 * 3 / 5)
    # top-2: c1 -> {1, 0} ok, c2 -> {0, 1} ok
    assert out["t2i_r@2"] == pytest.approx(100.0)


def test_perplexity_and_bits() -> None:
    nll = torch.tensor([math.log(4.0)] * 6)  # a uniform 4-way guess per token
    m = TokenNLL()
    m.update(nll[:4].sum(), 4)
    m.update(nll[4:].sum(), 2)
    out = m.compute()
    assert float(out["perplexity"]) == pytest.approx(4.0)
    assert float(out["bits_per_token"]) == pytest.approx(2.0)
    assert perplexity(float(nll.sum()), 6) == pytest.approx(4.0)
    assert bits_per_dim(6 * math.log(2), 3) == pytest.approx(2.0)


def test_zeroshot_head_matches_direct_computation() -> None:
    from reprolab.models.clip import CLIPBackbone

    torch.manual_seed(0)
    bb = CLIPBackbone("t", "reprolab-tiny-clip", pretrained=None)
    classes, templates = ["red_square", "circle"], ["a photo of a {}.", "a {} shape"]
    head = bb.zeroshot_weights(classes, templates)
    tok = bb.tokenizer
    rows = []
    for c in classes:
        texts = [t.format(c.replace("_", " ")) for t in templates]
        e = bb.model.encode_text(tok(texts))
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        rows.append(m / m.norm())
    expected = torch.stack(rows)
    assert torch.allclose(head, expected, atol=1e-6)
    assert torch.allclose(head.norm(dim=-1), torch.ones(2), atol=1e-6)
    images = torch.randn(3, 3, bb.preprocess.image_size, bb.preprocess.image_size)
    feats = F.normalize(bb.model.encode_image(images), dim=-1)
    assert torch.allclose(bb.logits(images, head), bb.logit_scale * feats @ expected.t(), atol=1e-5)
    assert bb.zeroshot_weights(classes, templates) is head  # cached, text encoded once


def _np_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(
                (pred[inside] == labels[inside]).mean() - conf[inside].mean()
            )
    return total


def test_batch_averaged_ece_is_the_size_weighted_mean_of_per_batch_ece() -> None:
    from reprolab.metrics.calibration import BatchAveragedECE

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(50, 4, generator=g), -1)
    labels = torch.randint(0, 4, (50,), generator=g)
    metric = BatchAveragedECE(n_bins=10)
    expected, p, y = 0.0, probs.numpy(), labels.numpy()
    for lo in range(0, 50, 16):  # batches of 16, 16, 16, 2: the last partial batch counts by size
        metric.update(probs[lo : lo + 16], labels[lo : lo + 16])
        expected += len(y[lo : lo + 16]) * _np_ece(p[lo : lo + 16], y[lo : lo + 16], 10)
    assert float(metric.compute()) == pytest.approx(expected / 50, abs=1e-6)
    assert float(metric.compute()) != pytest.approx(_np_ece(p, y, 10), abs=1e-4)  # not global


def test_smallest_singular_value_matches_numpy_on_standardised_features() -> None:
    from reprolab.metrics.features import smallest_singular_value

    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])
    x[:, 4] = x[:, 0] + 0.05 * x[:, 4]  # nearly collinear: a small singular value
    z = (x.double().numpy() - x.double().numpy().mean(0)) / x.double().numpy().std(0, ddof=1)
    expected = np.linalg.svd(z.T @ z / 199, compute_uv=False).min()
    assert smallest_singular_value(x) == pytest.approx(expected, rel=1e-6)
    assert smallest_singular_value(x) == pytest.approx(smallest_singular_value(1000 * x), rel=1e-5)
