"""Image-text retrieval fine-tuning (the m2-mix paper): geometry, losses, metrics, data and runs,
each against an independent computation (NumPy loops, hand cases)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from reprolab.data.info import ImageClassificationInfo, RetrievalInfo, TaskInfoError
from reprolab.errors import ReprolabError
from reprolab.methods.finetuning.m2mix import m2mix_loss, slerp, soft_clip_loss
from reprolab.metrics.retrieval import (
    alignment,
    cosine_diagnostics,
    embedding_geometry,
    modality_gap,
    recall_at_k,
    relative_alignment,
    retrieval_ece,
    uniformity,
)
from reprolab.train import run
from reprolab.utils.config import compose_train


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


# -- slerp ----------------------------------------------------------------------------------------


def test_slerp_stays_on_the_sphere_returns_its_end_points_and_matches_numpy() -> None:
    a, b = _unit(6, 5, 0).float(), _unit(6, 5, 1).float()
    assert torch.allclose(slerp(a, b, 1.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 0.0), b, atol=1e-5)
    for lam in (0.1, 0.37, 0.5, 0.9):
        m = slerp(a, b, lam)
        assert torch.allclose(m.norm(dim=-1), torch.ones(6), atol=1e-5)
        an, bn = a.double().numpy(), b.double().numpy()
        for i in range(6):
            theta = math.acos(float(an[i] @ bn[i]))
            ref = (math.sin(lam * theta) * an[i] + math.sin((1 - lam) * theta) * bn[i]) / math.sin(
                theta
            )
            np.testing.assert_allclose(m[i].numpy(), ref, atol=1e-5)
    # geodesic: the angle to a is (1 - lam) of the whole angle
    lam = 0.25
    whole = torch.arccos((a * b).sum(-1))
    to_a = torch.arccos((slerp(a, b, lam) * a).sum(-1).clamp(-1, 1))
    assert torch.allclose(to_a, (1 - lam) * whole, atol=1e-3)


def test_slerp_of_identical_vectors_is_finite() -> None:
    a = _unit(4, 3, 2).float()
    out = slerp(a, a.clone(), 0.3)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, a, atol=1e-3)


# -- losses ---------------------------------------------------------------------------------------


def _np_ce_rows(z: np.ndarray, targets: np.ndarray) -> float:
    out = []
    for i in range(z.shape[0]):
        zi = z[i] - z[i].max()
        out.append(-(zi[targets[i]] - math.log(np.exp(zi).sum())))
    return float(np.mean(out))


def test_m2mix_loss_matches_a_hand_computation_on_three_pairs() -> None:
    u, v = _unit(3, 4, 3).float(), _unit(3, 4, 4).float()
    lam, tau = 0.3, 0.07
    got = float(m2mix_loss(u, v, lam, tau))
    un, vn = u.double().numpy(), v.double().numpy()
    m = []
    for j in range(3):
        th = math.acos(float(un[j] @ vn[j]))
        m.append((math.sin(lam * th) * un[j] + math.sin((1 - lam) * th) * vn[j]) / math.sin(th))
    m = np.stack(m)
    a = np.array([[un[i] @ (vn[i] if i == j else m[j]) for j in range(3)] for i in range(3)]) / tau
    b = np.array([[vn[i] @ (un[i] if i == j else m[j]) for j in range(3)] for i in range(3)]) / tau
    ref = _np_ce_rows(a, np.arange(3)) + _np_ce_rows(b, np.arange(3))
    assert got == pytest.approx(ref, rel=1e-4)


def test_soft_clip_loss_is_the_released_symmetric_soft_cross_entropy() -> None:
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lam = 0.2
    eye = torch.eye(4, dtype=torch.float64)
    t = lam * eye + (1 - lam) * eye.flip(0)
    ref = 0.0
    zn, tn = z.numpy(), t.numpy()
    for i in range(4):
        lr = zn[i] - np.log(np.exp(zn[i]).sum())
        lc = zn[:, i] - np.log(np.exp(zn[:, i]).sum())
        ref += 0.5 * (-(tn[i] * lr).sum() - (tn[:, i] * lc).sum())
    assert float(soft_clip_loss(z, t)) == pytest.approx(ref / 4, rel=1e-9)
    # with one-hot targets it is the usual symmetric InfoNCE (open_clip's ClipLoss)
    from reprolab.methods.finetuning.flyp import contrastive_loss

    u, v = _unit(4, 3, 6).float(), _unit(4, 3, 7).float()
    clip = contrastive_loss()(u, v, torch.tensor(100.0))
    assert float(soft_clip_loss(100.0 * u @ v.t(), torch.eye(4))) == pytest.approx(
        float(clip), rel=1e-5
    )


# -- metrics --------------------------------------------------------------------------------------


def test_recall_with_five_captions_an_image_by_hand() -> None:
    # 2 images, 5 captions each (captions 0-4 of image 0, 5-9 of image 1).
    owner = torch.tensor([0] * 5 + [1] * 5)
    sim = torch.zeros(2, 10)
    sim[0] = torch.tensor(
        [0.1, 0.2, 0.9, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    )  # best own 0.9: rank 0
    sim[1] = torch.tensor(
        [0.8, 0.0, 0.0, 0.0, 0.0, 0.3, 0.7, 0.1, 0.1, 0.1]
    )  # best own 0.7: rank 1
    out = recall_at_k(sim, owner, ks=(1, 2))
    assert out["i2t_r@1"] == 50.0 and out["i2t_r@2"] == 100.0
    # text->image: caption j ranks its own image first unless the other scores strictly higher
    own = sim[owner, torch.arange(10)]
    other = sim[1 - owner, torch.arange(10)]
    assert out["t2i_r@1"] == pytest.approx(100 * float((own >= other).float().mean()))
    assert out["t2i_r@2"] == 100.0
    assert out["rsum"] == pytest.approx(sum(out[k] for k in out if "_r@" in k))
    assert out["r1_sum"] == out["i2t_r@1"] + out["t2i_r@1"]


def test_recall_ranks_are_strict_so_ties_do_not_depend_on_topk_order() -> None:
    sim = torch.ones(3, 3)  # every candidate ties with the positive
    out = recall_at_k(sim, torch.arange(3), ks=(1,))
    assert out["i2t_r@1"] == 100.0 and out["t2i_r@1"] == 100.0


def test_uniformity_alignment_and_gap_match_direct_computations() -> None:
    u, v = _unit(7, 4, 8), _unit(7, 4, 9)
    x = torch.cat([u, v]).numpy()
    pairs = [
        math.exp(-2 * float(((x[i] - x[j]) ** 2).sum()))
        for i in range(len(x))
        for j in range(i + 1, len(x))
    ]
    assert uniformity(torch.cat([u, v])) == pytest.approx(math.log(np.mean(pairs)), rel=1e-6)
    un, vn = u.numpy(), v.numpy()
    assert alignment(u, v) == pytest.approx(float(np.mean(((un - vn) ** 2).sum(1))), rel=1e-9)
    rel = np.mean(
        [
            ((vn[i] - un[i]) ** 2).sum()
            - min(((vn[i] - un[j]) ** 2).sum() for j in range(7) if j != i)
            for i in range(7)
        ]
    )
    assert relative_alignment(v, u) == pytest.approx(float(rel), rel=1e-9)
    assert modality_gap(u, v) == pytest.approx(float(np.linalg.norm(un.mean(0) - vn.mean(0))))
    cos = cosine_diagnostics(u, v)
    assert cos["cos_pos"] == pytest.approx(float(np.mean(np.abs((un * vn).sum(1)))))
    geo = embedding_geometry(u, v, code_compat=True)
    assert geo["uniformity_code"] == pytest.approx(uniformity(torch.cat([u, u])))
    # the same set twice has N zero-distance pairs: less uniform than the multimodal set (P8)
    assert geo["uniformity_code"] > uniformity(u)


def test_retrieval_ece_is_the_standard_binned_ece_of_each_direction() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.6], [0.0, 0.3, 0.4]])
    out = retrieval_ece(sim, scale=5.0, n_bins=10)
    for key, z in (("ece_i2t", 5.0 * sim), ("ece_t2i", 5.0 * sim.t())):
        p = z.softmax(-1).numpy()
        conf, pred = p.max(1), p.argmax(1)
        correct = pred == np.arange(3)
        ece = 0.0
        for b in range(10):
            lo, hi = b / 10, (b + 1) / 10
            m = (conf > lo) & (conf <= hi)
            if m.any():
                ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
        assert out[key] == pytest.approx(ece, abs=1e-6)


# -- DDP ------------------------------------------------------------------------------------------

WORLD, LOCAL, DIM = 2, 3, 5


def _ddp_batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(WORLD * LOCAL, DIM, generator=g), torch.randn(
        WORLD * LOCAL, DIM, generator=g
    )


def _m2(xu, xv, w, rank, world):
    from open_clip.loss import gather_features

    u, v = F.normalize(xu @ w, dim=-1), F.normalize(xv @ w, dim=-1)
    if world == 1:
        return m2mix_loss(u, v, 0.4, 0.07)
    all_u, all_v = gather_features(u, v, True, True, rank, world)
    return m2mix_loss(u, v, 0.4, 0.07, all_u, all_v, rank * u.shape[0])


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    xu, xv = _ddp_batch()
    w = torch.eye(DIM).requires_grad_(True)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = _m2(xu[rows], xv[rows], w, rank, WORLD)
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    value = loss.detach().clone()
    dist.all_reduce(value)
    if rank == 0:
        torch.save({"loss": value / WORLD, "grad": grad / WORLD}, out)
    dist.destroy_process_group()


def test_m2mix_under_ddp_sees_the_global_batch(tmp_path: Path) -> None:
    """The m2 term's negatives come from the gathered batch: the mean over ranks of the per-rank
    loss and the averaged gradients equal the single-process ones on the global batch (P18)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "m2.pt")
    mp.spawn(_ddp_worker, args=(port, out), nprocs=WORLD, join=True)
    ddp = torch.load(out)
    xu, xv = _ddp_batch()
    w = torch.eye(DIM).requires_grad_(True)
    loss = _m2(xu, xv, w, 0, 1)
    loss.backward()
    assert float(ddp["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert torch.allclose(ddp["grad"], w.grad, atol=1e-5)


# -- data -----------------------------------------------------------------------------------------


def _scenes(**kw):
    from reprolab.data.retrieval import RetrievalDataModule

    return RetrievalDataModule(
        "captioned_scenes",
        "captioned_scenes",
        dataset_kwargs={"train_size": 12, "val_size": 6, "test_size": 8},
        batch_size=4,
        eval_batch_size=5,
        num_workers=0,
        **kw,
    )


def test_captioned_scenes_have_five_captions_and_held_out_splits() -> None:
    from reprolab.data.spec import get_spec

    spec = get_spec("captioned_scenes", train_size=12, val_size=6, test_size=8)
    train, test = spec.load(None, "train"), spec.load(None, "test")
    assert len(train) == 12 and len(test) == 8
    assert all(len(c) == 5 for c in train.captions + test.captions)
    again = get_spec("captioned_scenes", train_size=12, val_size=6, test_size=8).load(None, "test")
    assert again.captions == test.captions  # deterministic
    a, b = np.asarray(train[0]["image"]), np.asarray(test[0]["image"])
    assert a.shape == b.shape and not np.array_equal(a, b)  # other world seeds per split


def test_train_pairs_first_or_all_and_eval_batches_keep_caption_lists() -> None:
    from reprolab.data.transforms import Preprocess

    pre = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dm = _scenes(train_captions="all", eval_captions=3)
    dm.configure(preprocess=pre)
    dm.setup("fit")
    assert len(dm._sets["train"]) == 12 * 5
    batch = next(iter(dm.test_dataloader()[0]))
    assert len(batch["captions"]) == 5 and all(len(c) == 3 for c in batch["captions"])
    assert batch["image"].shape == (5, 3, 64, 64)
    first = _scenes()
    first.configure(preprocess=pre)
    first.setup("fit")
    train = first.train_dataloader()
    assert len(first._sets["train"]) == 12
    b = next(iter(train))
    assert len(b["caption"]) == 4 and isinstance(b["caption"][0], str)
    spec_caps = first._sets["train"].split.captions
    assert all(c == spec_caps[i][0] for c, i in zip(b["caption"], b["index"].tolist(), strict=True))
    assert dm.info.captions_per_image == 3 and isinstance(dm.info, RetrievalInfo)


def test_retrieval_data_and_methods_refuse_the_wrong_task_in_one_line() -> None:
    from reprolab.data.retrieval import RetrievalDataModule
    from reprolab.methods.finetuning.retrieval import ZeroShotRetrieval

    with pytest.raises(TaskInfoError, match="has no captions"):
        RetrievalDataModule("shapes", "shapes")
    info = ImageClassificationInfo(name="shapes", classnames=("a",), templates=("{}",))
    with pytest.raises(TaskInfoError, match="needs an image-text retrieval task") as err:
        ZeroShotRetrieval("zeroshot_retrieval", model=object(), info=info)
    assert "\n" not in str(err.value)
    with pytest.raises(ReprolabError, match="eval_captions"):
        _scenes(eval_captions=6)


# -- runs -----------------------------------------------------------------------------------------

SMALL = [
    "data=captioned_scenes",
    "data.dataset_kwargs.train_size=64",
    "data.dataset_kwargs.val_size=24",
    "data.dataset_kwargs.test_size=40",
    "data.batch_size=16",
    "logger=csv",
    "threads=1",
]
FT = ["model.trainable=both", "model.train_logit_scale=false", "+trainer.max_steps=6"]


@pytest.fixture(scope="module")
def retrieval_runs(tmp_path_factory) -> dict:
    logs = tmp_path_factory.mktemp("logs")
    out = {}
    for name, extra in [
        ("zeroshot_retrieval", []),
        ("clip_ft", FT),
        ("m2mix", [*FT, "method.m2_weight=0.0"]),
        ("m3mix", FT),
    ]:
        cfg = compose_train([f"method={name}", *SMALL, *extra, f"paths.log_dir={logs / name}"])
        out[name] = run(cfg)
    return out


def test_zero_shot_retrieval_logs_every_key_and_matches_a_direct_ranking(retrieval_runs) -> None:
    from reprolab.data.spec import get_spec
    from reprolab.methods.finetuning.retrieval import ALL_KEYS

    m = retrieval_runs["zeroshot_retrieval"]["metrics"]
    for k in ALL_KEYS:
        assert f"test/{k}" in m and f"test/test/{k}" in m
    # direct: encode the 40 test images and their 5 captions with the backbone, rank by hand
    import hydra

    cfg = compose_train(["method=zeroshot_retrieval", *SMALL])
    backbone = hydra.utils.instantiate(cfg.model).eval()
    from reprolab.data.transforms import build_transforms

    split = get_spec("captioned_scenes", train_size=64, val_size=24, test_size=40).load(
        None, "test"
    )
    tf = build_transforms(backbone.preprocess, False, False)
    with torch.no_grad():
        u = F.normalize(
            backbone.encode_image(torch.stack([tf(split[i]["image"]) for i in range(40)])), dim=-1
        )
        v = F.normalize(backbone.encode_text([c for caps in split.captions for c in caps]), dim=-1)
    sim = (u @ v.t()).numpy()
    hits = [
        max(sim[i, 5 * i : 5 * i + 5]) >= np.delete(sim[i], range(5 * i, 5 * i + 5)).max()
        for i in range(40)
    ]
    assert m["test/i2t_r@1"] == pytest.approx(100 * np.mean(hits), abs=1e-4)


def test_fine_tuning_moves_the_model_and_m2_weight_0_is_clip_ft(retrieval_runs) -> None:
    zs, ft, m2, m3 = (
        retrieval_runs[k]["metrics"] for k in ("zeroshot_retrieval", "clip_ft", "m2mix", "m3mix")
    )
    assert ft["test/alignment"] != zs["test/alignment"]
    for k in ("test/rsum", "test/alignment", "test/uniformity"):
        assert m2[k] == pytest.approx(ft[k], abs=1e-6)  # no mix term: the same run
    assert m3["test/alignment"] != ft["test/alignment"]
    assert "val/r1_sum" in ft and 0 < ft["params/trainable"] <= ft["params/total"]
