"""MixDiff (ECAI 2024): the score against a loop-by-loop reference, γ = 0, query counts, the
oracle's closure, the 2-D blob world of spec §3.5, and a tiny_clip run on shapes_ood."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.methods.ood.mixdiff import (
    MixDiffScorer,
    expected_cost,
    mixing_rates,
    sample_references,
    stream_batches,
)
from reprolab.methods.ood.scores import oodness
from reprolab.metrics.ood import ood_metrics
from reprolab.models.blackbox import BlackBox, BlackBoxGradientError

CLASSES = ["cat", "dog", "car"]


class FakeCLIP(nn.Module):
    """A linear "CLIP" with the ZeroShotBackbone protocol (encode_image, zeroshot_weights)."""

    def __init__(self, dim: int = 8, size: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * size * size, dim)
        self.logit_scale = 10.0
        self.dim = dim

    def encode_image(self, images: Tensor) -> Tensor:
        return self.proj(images.flatten(1))  # (B, D)

    def zeroshot_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        gen = torch.Generator().manual_seed(1)
        return F.normalize(torch.randn(len(classnames), self.dim, generator=gen), dim=-1)


SETTINGS = [  # (aux, output, score)
    ("in_batch", "logits", "entropy"),
    ("in_batch", "probs", "msp"),
    ("rand_id", "logits", "energy"),
    ("rand_id", "embedding", "msp"),
    ("oracle", "label", "onehot"),
    ("oracle", "logits", "mcm"),
]


def reference_terms(bb_fn, h, diff, x, oracles, aux, aux_images, r, embed=None) -> Tensor:
    """MixDiff_t by explicit loops over targets, auxiliaries, rates and oracles (spec §3.2)."""
    enc = embed or (lambda v: v)
    z, refs = enc(x), enc(oracles.flatten(0, 1)).view(*oracles.shape[:2], -1)
    zx = z.view(z.shape[0], -1)
    pred = bb_fn(z).argmax(-1)
    rates = [(i + 1) / (r + 1) for i in range(r)]
    terms = []
    for t in range(len(x)):
        k = int(pred[t])
        if aux == "in_batch":
            pool = [zx[j] for j in range(len(x)) if j != t]
        elif aux == "rand_id":
            pool = list(enc(aux_images).view(len(aux_images), -1))
        else:
            pool = list(refs[k])
        vals = []
        for i, a in enumerate(pool):
            for lam in rates:
                target = bb_fn((lam * zx[t] + (1 - lam) * a).view(1, *z.shape[1:]))
                ms = [m for m in range(len(refs[k])) if not (aux == "oracle" and m == i)]
                mixes = [(lam * refs[k][m] + (1 - lam) * a).view(1, *z.shape[1:]) for m in ms]
                o_mean = torch.cat([bb_fn(v) for v in mixes]).mean(0, keepdim=True)
                vals.append(float(diff(target, o_mean)))
        terms.append(sum(vals) / len(vals))
    return torch.tensor(terms)


@pytest.mark.parametrize(("aux", "output", "score"), SETTINGS)
def test_score_matches_a_loop_reference_and_gamma_zero_is_the_base(aux, output, score) -> None:
    model = FakeCLIP()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=g)
    oracles = torch.randn(3, 4, 3, 4, 4, generator=g)  # K = 3, M = 4
    aux_images = torch.randn(3, 3, 4, 4, generator=g) if aux == "rand_id" else None
    p = 3 if aux == "rand_id" else None
    bb = BlackBox(model, CLASSES, ["{}"], output=output, max_batch=7)  # odd chunks on purpose
    sc = MixDiffScorer(bb, score=score, aux=aux, m=4, r=2, p=p, gamma=2.0, temperature=0.7)
    sc.set_references(oracles, aux_images)
    z, out = sc.query(x)
    parts = sc.score_batch(z, out)

    # The reference uses the model itself (not the oracle) and recomputes every mix.
    w = F.normalize(model.zeroshot_weights(CLASSES, ["{}"]), dim=-1)
    kind = {"logits": "logits", "embedding": "logits", "probs": "probs", "label": "label"}[output]

    def logits(v: Tensor) -> Tensor:
        if output == "embedding":
            return 10.0 * v @ w.T
        return 10.0 * F.normalize(model.encode_image(v), dim=-1) @ w.T

    def answer(v: Tensor) -> Tensor:
        o = logits(v)
        return {"probs": o.softmax(-1), "label": F.one_hot(o.argmax(-1), 3).float()}.get(output, o)

    def h(o: Tensor) -> Tensor:
        return oodness(score, o, kind, 10.0, 0.7)

    def diff(t: Tensor, o: Tensor) -> Tensor:
        return -(t * o).mean() if score == "onehot" else (h(t) - h(o)).squeeze()

    embed = (
        (lambda v: F.normalize(model.encode_image(v), dim=-1)) if output == "embedding" else None
    )
    with torch.no_grad():
        ref = reference_terms(answer, h, diff, x, oracles, aux, aux_images, 2, embed)
        base = h(answer(embed(x) if embed else x))
    torch.testing.assert_close(parts.term, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts.base, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, parts.base + 2.0 * parts.term)
    if score == "onehot":
        assert torch.equal(parts.base, torch.zeros(5))  # label-only: no base score

    zero = MixDiffScorer(bb, score=score, aux=aux, m=4, r=2, p=p, gamma=0.0, temperature=0.7)
    zero.set_references(oracles, aux_images)
    assert torch.equal(zero.score_batch(z, out).total, parts.base)  # exactly, not approximately
    alone = MixDiffScorer(bb, score, aux, 4, 2, p, add_base_score=False, temperature=0.7)
    alone.set_references(oracles, aux_images)
    torch.testing.assert_close(alone.score_batch(z, out).total, 2.0 * parts.term)


@pytest.mark.parametrize(("aux", "output", "score"), SETTINGS)
def test_queries_per_batch_equal_the_formula(aux, output, score) -> None:
    n, m, r, k = 5, 4, 2, 3
    p = 3 if aux == "rand_id" else None
    bb = BlackBox(FakeCLIP(), CLASSES, ["{}"], output=output, max_batch=16)
    sc = MixDiffScorer(bb, score=score, aux=aux, m=m, r=r, p=p)
    g = torch.Generator().manual_seed(0)
    sc.set_references(
        torch.randn(k, m, 3, 4, 4, generator=g),
        torch.randn(3, 3, 4, 4, generator=g) if p else None,
    )
    once = dict(bb.eval_counts["test"], head=bb.head_evals["test"])
    for _ in range(2):  # two batches of N = 5: the oracle side is paid once
        sc.score_batch(*sc.query(torch.randn(n, 3, 4, 4, generator=g)))
    counts = bb.eval_counts["test"]
    want = expected_cost(aux, output, [n, n], m, r, k, p)
    assert {"images": counts["images"], "head": bb.head_evals["test"]} == want == sc.cost
    # The spec's formulas (§3.1, §3.5), written out: P = N - 1 (in_batch), P (rand_id), M (oracle).
    per_batch = {
        "in_batch": n * (1 + (n - 1) * r) + n * m * (n - 1) * r,
        "rand_id": n * (1 + 3 * r),
        "oracle": n * (1 + m * r),
    }[aux]
    oracle_side = {"in_batch": 0, "rand_id": k * m * 3 * r, "oracle": k * m * (m - 1) * r}[aux]
    if output == "embedding":  # mixes are head evaluations; images: targets + K M (+ P) embeddings
        assert once == {"queries": once["queries"], "images": k * m + 3, "head": oracle_side}
        assert want == {"images": 2 * n + k * m + 3, "head": 2 * per_batch + oracle_side - 2 * 0}
    else:
        assert once["images"] == oracle_side and once["head"] == 0
        assert want["images"] == 2 * per_batch + oracle_side
    assert counts["queries"] >= 2 and bb.queries == 0  # test phase only, never the train budget


def test_rates_stream_and_reference_sampling() -> None:
    assert mixing_rates(3).tolist() == [0.25, 0.5, 0.75]  # r / (R + 1)
    assert stream_batches(31, 15) == [15, 16] and stream_batches(30, 15) == [15, 15]
    assert stream_batches(7, 15) == [7] and stream_batches(16, 5) == [5, 5, 6]
    labels = [i % 4 for i in range(40)]  # 10 per class
    o1, a1 = sample_references(labels, 4, 6, 5, seed=3)
    o2, a2 = sample_references(labels, 4, 6, 5, seed=3)
    assert torch.equal(o1, o2) and torch.equal(a1, a2)  # seeded
    assert o1.shape == (4, 6) and all(labels[i] == k for k in range(4) for i in o1[k].tolist())
    assert len(set(o1.flatten().tolist())) == 24  # without replacement
    assert not set(a1.tolist()) & set(o1.flatten().tolist()) and len(set(a1.tolist())) == 5
    assert not torch.equal(sample_references(labels, 4, 6, None, seed=4)[0], o1)
    from reprolab.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="class 'a' has 10 ID train images") as e:
        sample_references(labels, 4, 11, None, 0, ["a", "b", "c", "d"])
    assert "\n" not in str(e.value) and "data.num_shots" in str(e.value)


def test_the_oracle_never_exposes_gradients() -> None:
    model = FakeCLIP()
    for output in ("logits", "probs", "label", "embedding"):
        bb = BlackBox(model, CLASSES, ["{}"], output=output)
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        with pytest.raises(BlackBoxGradientError):
            bb(x, phase="test")
        with torch.enable_grad():
            out = bb(x.detach(), phase="test")
        assert not out.requires_grad and out.grad_fn is None
        if output == "embedding":
            with pytest.raises(BlackBoxGradientError):
                bb.head(out.clone().requires_grad_())
            assert bb.head(out).grad_fn is None
        else:
            with pytest.raises(ValueError, match="output='embedding'"):
                bb.head(torch.randn(2, 8))
        sc = MixDiffScorer(
            bb, score="onehot" if output == "label" else "msp", aux="oracle", m=2, r=1
        )
        with torch.enable_grad():
            sc.set_references(torch.randn(3, 2, 3, 4, 4, requires_grad=True).detach())
            parts = sc.score_batch(*sc.query(torch.randn(3, 3, 4, 4)))
        assert not parts.total.requires_grad
    assert all(not p.requires_grad for p in model.parameters())
    for name in ("backbone", "model", "parameters", "state_dict"):
        assert not hasattr(bb, name)


# -- the 2-D blob world (spec §3.5) ---------------------------------------------------------------
def blob_world(seed: int, n: int = 200, m: int = 15, p: int = 14):
    """K = 4 ID Gaussian blobs (radius 3, std 1) under a fixed linear-softmax classifier whose logit
    directions point at them; the OOD blob sits beyond blob 0 along its logit direction (radius 9)."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.arange(4) * (math.pi / 2)
    dirs = torch.stack([ang.cos(), ang.sin()], 1)  # (4, 2)
    clf = nn.Linear(2, 4)
    with torch.no_grad():
        clf.weight.copy_(dirs)
        clf.bias.zero_()
    y = torch.randint(0, 4, (n,), generator=g)
    x_id = 3 * dirs[y] + torch.randn(n, 2, generator=g)
    x_ood = 9 * dirs[0] + torch.randn(n, 2, generator=g)
    y_tr = torch.arange(4).repeat_interleave(50)
    x_tr = 3 * dirs[y_tr] + torch.randn(200, 2, generator=g)
    oracles = torch.stack([x_tr[y_tr == k][:m] for k in range(4)])  # (4, M, 2)
    aux = x_tr[torch.randperm(200, generator=g)[:p]]
    return clf, x_id, x_ood, oracles, aux, g


def blob_aurocs(seed: int, output: str, score: str, aux: str, n_batch: int, gamma: float):
    """AUROC (%) of MSP and of MixDiff's total, base and term on the blob world; ID positive."""
    clf, x_id, x_ood, oracles, aux_x, g = blob_world(seed)
    bb = BlackBox(clf, None, output=output, max_batch=4096)  # a plain classifier target
    sc = MixDiffScorer(
        bb, score=score, aux=aux, m=15, r=7, p=14 if aux == "rand_id" else None, gamma=gamma
    )
    sc.set_references(oracles, aux_x if aux == "rand_id" else None)
    x = torch.cat([x_id, x_ood])
    is_id = torch.cat([torch.ones(len(x_id)), torch.zeros(len(x_ood))]).bool()
    order = torch.randperm(len(x), generator=g)  # a shuffled open-set test stream
    x, is_id = x[order], is_id[order]
    parts = [sc.score_batch(*sc.query(x[s : s + n_batch])) for s in range(0, len(x), n_batch)]
    with torch.no_grad():
        msp = clf(x).softmax(-1).max(-1).values  # higher = ID

    def auroc(s: Tensor) -> float:
        return ood_metrics(s[is_id], s[~is_id])["auroc"]

    total, term = (torch.cat([getattr(q, k) for q in parts]) for k in ("total", "term"))
    return {"msp": auroc(msp), "total": auroc(-total), "term": auroc(-term)}


def test_blob_world_label_only_mixdiff_recovers_the_ood_blob_that_fools_msp() -> None:
    """MSP is fooled by the overconfident OOD blob (AUROC < 50); label-only MixDiff (one-hot form,
    rand_id aux, `label/onehot_agmax_rnd_id.sh`: P 14, M 15, R 7, γ 1) separates it. Measured
    margins over MSP, seeds 0-2: +98.3 / +91.1 / +98.7 AUROC points (MSP: 0.0-0.01)."""
    for seed in range(3):
        a = blob_aurocs(seed, "label", "onehot", "rand_id", n_batch=3, gamma=1.0)
        assert a["msp"] < 50.0
        assert a["total"] > a["msp"] + 10.0, (seed, a)


@pytest.mark.xfail(
    strict=True,
    reason="spec §3.5's claim fails for a linear black box: the logits of a mix are affine, so a "
    "target mix minus the oracle mean is λ(z_t - z̄_k), which for an OOD point beyond blob k points "
    "along class k's logit: every target mix is more confident than its oracle mix, the MixDiff "
    "term is fooled like MSP (term AUROC 0.5-0.8%). Measured AUROC(MSP+MixDiff) - AUROC(MSP): "
    "+0.43 / +0.23 / +0.22 points (seeds 0-2, MSP 0.0-0.01%).",
)
def test_blob_world_logit_mixdiff_beats_msp_as_the_spec_claims() -> None:
    for seed in range(3):
        a = blob_aurocs(seed, "logits", "msp", "in_batch", n_batch=15, gamma=2.0)
        assert a["msp"] < 50.0
        assert a["total"] > a["msp"] + 10.0, (seed, a)


# -- the method on tiny_clip ----------------------------------------------------------------------
def _run(tmp_path, *overrides: str) -> dict:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_clip",
            "data=shapes_ood",
            "trainer=cpu",
            "logger=csv",
            "threads=1",
            f"paths.log_dir={tmp_path}",
            "progress_bar=false",
            "data.eval_batch_size=20",
            "++trainer.limit_test_batches=1",
            *overrides,
        ]
    )
    return run(cfg)["metrics"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.aux=in_batch", "method.n=6", "method.m=2", "method.r=1"],
        ["method.aux=oracle", "method.m=3", "method.r=2", "method.output=probs"],
        [
            "method.aux=rand_id",
            "method.p=3",
            "method.m=2",
            "method.r=2",
            "method.output=embedding",
            "method.base_score=msp",
        ],
        [
            "method.aux=rand_id",
            "method.p=2",
            "method.m=2",
            "method.r=1",
            "method.output=label",
            "method.base_score=onehot",
            "method.gamma=1.0",
        ],
    ],
    ids=["in_batch", "oracle_probs", "rand_id_embedding", "label_onehot"],
)
def test_tiny_clip_run_on_shapes_ood_counts_queries_by_the_formula(tmp_path, overrides) -> None:
    m = _run(tmp_path, "method=mixdiff", *overrides)
    o = dict(kv.split("=") for kv in overrides)
    aux, output = o["method.aux"], o.get("method.output", "logits")
    mm, rr, p = int(o["method.m"]), int(o["method.r"]), int(o.get("method.p", 0)) or None
    n = 40  # one batch of 20 from the ID test set and one from ood_digits
    sizes = stream_batches(n, int(o["method.n"])) if aux == "in_batch" else [20, 20]
    want = expected_cost(aux, output, sizes, mm, rr, 10, p)  # 10 shape classes
    assert m["test/scored_samples"] == n
    assert m["test/images_per_sample"] == pytest.approx(want["images"] / n)
    assert m["test/queries_per_sample"] == pytest.approx((want["images"] + want["head"]) / n)
    assert m["test/images"] == want["images"] + 20  # + the shift set, classified only
    for key in ("auroc", "fpr95", "fpr95_oodpos", "base_auroc", "term_auroc"):
        assert -1e-3 <= m[f"test/ood_digits/{key}"] <= 100.0 + 1e-3
    assert m["test/acc"] > 50.0


def test_gamma_zero_run_equals_the_base_scorer_run(tmp_path) -> None:
    base = _run(tmp_path / "a", "method=msp")
    mixdiff = _run(
        tmp_path / "b",
        "method=mixdiff",
        "method.base_score=msp",
        "method.gamma=0.0",
        "method.n=5",
        "method.m=2",
        "method.r=1",
    )
    for key in ("auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out"):
        assert mixdiff[f"test/ood_digits/{key}"] == base[f"test/ood_digits/{key}"]
    assert mixdiff["test/ood_digits/base_auroc"] == base["test/ood_digits/auroc"]


def test_bad_settings_fail_at_build_time_in_one_line() -> None:
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.errors import ConfigValueError
    from reprolab.methods.ood.mixdiff import MixDiff

    info = ClassificationDataModule("shapes_ood", "shapes", dataset_kwargs={"ood": True}).info
    cases = [
        ({"aux": "in_batch", "p": 3}, "set method.p=null"),
        ({"aux": "rand_id"}, "set method.p >= 1"),
        ({"aux": "inbatch"}, "did you mean 'in_batch'"),
        ({"output": "label"}, "score entropy reads"),
        ({"base_score": "onehot"}, "score onehot reads label outputs"),
        ({"aux": "oracle", "m": 1}, "method.m >= 2"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigValueError, match=match) as e:
            MixDiff(name="mixdiff", model=FakeCLIP(), info=info, **kwargs)
        assert "\n" not in str(e.value)
