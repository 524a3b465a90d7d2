"""Robust fine-tuning (CaRot and its baselines): references, the WiSE-FT end points, LP-FT's hand-over,
the caption stream, and the errors a user can hit. Fast: tiny_clip on small robust_shapes splits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reprolab.data.info import ImageClassificationInfo, TaskInfoError
from reprolab.data.info import TestSet as _TestSet
from reprolab.errors import ReprolabError
from reprolab.methods.finetuning.carot import (
    CaRot,
    cross_frobenius_loss,
    ema_momentum,
    orthogonality_loss,
    text_projection,
    visual_projection,
)
from reprolab.methods.finetuning.flyp import contrastive_loss, soft_cross_entropy
from reprolab.methods.finetuning.source import SourceRunError
from reprolab.methods.finetuning.wise_ft import interpolate
from reprolab.optim.schedules import cosine_lr
from reprolab.train import run
from reprolab.utils.config import compose_train

SMALL = ["data.dataset_kwargs.train_size=64", "data.dataset_kwargs.test_size=40"]


def _backbone(trainable: str):
    import hydra

    cfg = compose_train(["model=tiny_clip", f"model.trainable={trainable}"])
    return hydra.utils.instantiate(cfg.model)


@pytest.fixture
def tiny_backbone():
    return _backbone("none")


@pytest.fixture
def tiny_backbone_both():
    return _backbone("both")


@pytest.fixture(scope="module")
def shapes_info() -> ImageClassificationInfo:
    from reprolab.data.spec import get_spec

    spec = get_spec("robust_shapes")
    return ImageClassificationInfo(
        name="robust_shapes",
        classnames=tuple(spec.classnames),
        templates=tuple(spec.templates),
        test_sets=tuple(_TestSet(n, r) for n, r in spec.test_roles().items()),
    )


def _np_ce(logits: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-np.mean(np.diag(logp)))


def test_symmetric_contrastive_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    scale = torch.tensor(7.5)
    z = 7.5 * u.numpy() @ v.numpy().T
    expected = 0.5 * (_np_ce(z) + _np_ce(z.T))
    assert float(contrastive_loss()(u, v, scale)) == pytest.approx(expected, rel=1e-5)


def test_orthogonality_and_cross_frobenius_terms_match_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(7, 4, generator=g), torch.randn(3, 4, generator=g)
    pn, tn = p.double().numpy(), t.double().numpy()
    assert float(orthogonality_loss(p)) == pytest.approx(
        np.sqrt(((pn.T @ pn - np.eye(4)) ** 2).sum()), rel=1e-5
    )
    assert float(cross_frobenius_loss(p, t)) == pytest.approx(
        np.sqrt(((pn @ tn.T) ** 2).sum()), rel=1e-5
    )
    q, _ = torch.linalg.qr(torch.randn(7, 4, generator=g))  # orthonormal columns
    assert float(orthogonality_loss(q)) == pytest.approx(0.0, abs=1e-5)


def test_projections_are_the_ones_features_are_made_with(tiny_backbone) -> None:
    model = tiny_backbone.model
    p, t = visual_projection(model), text_projection(model)
    assert p.shape[1] == t.shape[1]  # both map into the joint embedding
    # tiny_clip's tower is a CLIP ResNet: P is the attention pool's output projection, transposed
    assert torch.equal(p, model.visual.attnpool.c_proj.weight.t())


def test_soft_cross_entropy_equals_the_explicit_sum_and_is_finite_at_large_scale() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = 100 * torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    p_t = torch.softmax(t, -1)
    expected = -(p_t * torch.log_softmax(s, -1)).sum(-1).mean()
    assert float(soft_cross_entropy(s, t)) == pytest.approx(float(expected), rel=1e-6)
    assert torch.isfinite(soft_cross_entropy(1e4 * s, t))  # log(softmax) would give -inf * 0


def test_ema_momentum_schedule_matches_the_spec_formula() -> None:
    total = 25_030  # 10 ImageNet epochs of 2,503 steps
    assert ema_momentum(0, total, 0.05, 0.9, 0.2) == pytest.approx(0.05)
    assert ema_momentum(2503, total, 0.05, 0.9, 0.2) == pytest.approx(0.05 + 0.85 * 2503 / 5006)
    assert ema_momentum(5005, total, 0.05, 0.9, 0.2) < 0.9
    assert ema_momentum(5006, total, 0.05, 0.9, 0.2) == 0.9
    assert ema_momentum(25_000, total, 0.05, 0.9, 0.2) == 0.9


def test_cosine_lr_matches_the_released_formula() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine_lr(opt, warmup_steps=5, total_steps=25)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [
        0.1 * (s + 1) / 5 if s < 5 else 0.05 * (1 + math.cos(math.pi * (s - 5) / 20))
        for s in range(25)
    ]
    assert seen == pytest.approx(expected)
    with pytest.raises(ReprolabError, match="warmup_steps"):
        cosine_lr(opt, warmup_steps=30, total_steps=25)


def test_wise_interpolation_is_linear_and_keeps_integer_buffers() -> None:
    zs = {"w": torch.zeros(3), "n": torch.tensor(0)}
    ft = {"w": torch.ones(3) * 2, "n": torch.tensor(7)}
    mid = interpolate(zs, ft, 0.25)
    assert torch.allclose(mid["w"], torch.full((3,), 0.5)) and int(mid["n"]) == 7
    assert torch.equal(interpolate(zs, ft, 0.0)["w"], zs["w"])


# ------------------------------------------------------------------------------------- the EMA


def _carot(tiny_backbone_both, info, **kw) -> CaRot:
    return CaRot(name="carot", model=tiny_backbone_both, info=info, **kw)


def test_teacher_updates_at_every_500th_step_from_step_0_with_the_scheduled_momentum(
    tiny_backbone_both, shapes_info, monkeypatch
) -> None:
    method = _carot(tiny_backbone_both, shapes_info)
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(method, "update_teacher", lambda m: calls.append((step, m)))
    monkeypatch.setattr(method, "log", lambda *a, **k: None)
    total = 2_000
    for step in range(total):  # the hook runs after optimiser step `step` (global_step = step + 1)
        method._trainer = SimpleNamespace(global_step=step + 1, estimated_stepping_batches=total)
        method.on_train_batch_end(None, None, step)
    method._trainer = None
    assert [s for s, _ in calls] == [0, 500, 1000, 1500]
    # the ramp covers the first 20% (400 steps): step 0 at 0.05, every later update at 0.9
    assert [m for _, m in calls] == pytest.approx([0.05, 0.9, 0.9, 0.9])


def test_teacher_update_is_the_momentum_average(tiny_backbone_both, shapes_info) -> None:
    method = _carot(tiny_backbone_both, shapes_info)
    name, student = next(iter(method.backbone.model.named_parameters()))
    teacher = dict(method.teacher.named_parameters())[name]
    with torch.no_grad():
        teacher.fill_(1.0)
        student.fill_(3.0)
    method.update_teacher(0.25)
    assert torch.allclose(teacher, torch.full_like(teacher, 0.25 * 1 + 0.75 * 3))
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert method.param_counts()["params/total"] == sum(
        p.numel() for p in method.backbone.parameters()
    )


# ------------------------------------------------------------------------------ data and errors


def test_caption_pairs_visit_every_image_template_pair_once_an_epoch() -> None:
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.data.transforms import Preprocess

    dm = ClassificationDataModule(
        "robust_shapes",
        "robust_shapes",
        dataset_kwargs={"train_size": 20},
        num_shots=None,
        batch_size=10,
        val=False,
    )
    dm.configure(preprocess=Preprocess(32, (0.5,) * 3, (0.5,) * 3), caption_pairs=True)
    dm.setup()
    pairs = [
        (int(i), int(t))
        for b in dm.train_dataloader()
        for i, t in zip(b["index"], b["template"], strict=True)
    ]
    assert len(pairs) == 20 * 5 and len(set(pairs)) == 100


def test_flyp_and_carot_need_templates(tiny_backbone_both) -> None:
    info = ImageClassificationInfo(
        name="no_templates",
        classnames=("a", "b"),
        templates=(),
        test_sets=(_TestSet("test", "id"),),
    )
    with pytest.raises(TaskInfoError, match="templates"):
        _carot(tiny_backbone_both, info)


def test_a_method_on_the_wrong_trainable_towers_fails_in_one_line(
    tiny_backbone, shapes_info
) -> None:
    from reprolab.methods.finetuning.ft import FineTune

    with pytest.raises(ReprolabError, match="model.trainable=image") as e:
        FineTune(name="ft", model=tiny_backbone, info=shapes_info)
    assert "\n" not in str(e.value)


def test_wise_ft_on_a_missing_run_names_the_command_that_makes_it(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            "experiment=wise_ft_robust_shapes",
            f"paths.log_dir={tmp_path}",
            "seed=2",
            "logger=csv",
            "progress_bar=false",
        ]
    )
    with pytest.raises(SourceRunError) as e:
        run(cfg)
    msg = str(e.value)
    assert "python train.py experiment=ft_robust_shapes seed=2" in msg and "\n" not in msg


def test_wise_ft_on_a_run_of_another_model_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "carot_neurips24.tiny.ft.robust_shapes" / "seed1"
    source.mkdir(parents=True)
    (source / "metrics.json").write_text(
        json.dumps({"model": "clip_vit_b16", "status": "finished"})
    )
    cfg = compose_train(
        ["experiment=wise_ft_robust_shapes", f"paths.log_dir={tmp_path}", "logger=csv"]
    )
    with pytest.raises(SourceRunError, match="model=clip_vit_b16, not model=tiny_clip"):
        run(cfg)


# ------------------------------------------------------------------ end to end, tiny and quick


@pytest.fixture(scope="module")
def ft_runs(tmp_path_factory):
    """ZS, FT (20 steps) and WiSE-FT (alphas 0, 0.5, 1) of one seed on small splits."""
    log = tmp_path_factory.mktemp("ft_runs")
    common = [f"paths.log_dir={log}", "logger=csv", "progress_bar=false", "threads=1", *SMALL]
    out = {}
    for name, extra in [
        ("zeroshot", []),
        ("ft", ["trainer.max_steps=20", "method.scheduler.warmup_steps=2"]),
        ("wise_ft", ["method.alphas=[0.0,0.5,1.0]"]),
    ]:
        out[name] = run(compose_train([f"experiment={name}_robust_shapes", *common, *extra]))
    return out


def test_wise_ft_at_alpha_0_is_zero_shot_and_at_1_the_fine_tuned_model(ft_runs) -> None:
    wise, zs, ft = (ft_runs[k]["metrics"] for k in ("wise_ft", "zeroshot", "ft"))
    for s in ("test", "test_anywhere", "test_small_textured"):
        for k in ("acc", "ece", "nll"):
            assert wise[f"wise/alpha0/{s}/{k}"] == pytest.approx(zs[f"test/{s}/{k}"], abs=1e-4)
            assert wise[f"wise/alpha1/{s}/{k}"] == pytest.approx(ft[f"test/{s}/{k}"], abs=1e-4)
    assert wise["test/acc"] == wise["wise/alpha0.5/test/acc"]
    assert ft["test/acc"] != zs["test/acc"]  # FT moved the model: the end points differ


def test_fine_tuned_runs_log_the_carot_table_keys(ft_runs) -> None:
    m = ft_runs["ft"]["metrics"]
    assert m["test/avg_shift/acc"] == pytest.approx(
        (m["test/test_anywhere/acc"] + m["test/test_small_textured/acc"]) / 2
    )
    assert m["test/sigma_min"] > 0
    assert 0 < m["params/trainable"] < m["params/total"]


def test_lp_ft_hands_the_probe_head_to_fine_tuning(tmp_path: Path, monkeypatch) -> None:
    from reprolab.methods.finetuning.ft import LPFT

    seen: dict[str, torch.Tensor] = {}
    original = LPFT.start_round

    def spy(self, r, dm):
        if r == 1:
            seen["end_of_lp"] = self.head.weight.detach().clone()
        original(self, r, dm)
        if r == 1:
            seen["image_trains"] = all(p.requires_grad for p in self._image_params())
        if r == 0:
            seen["image_frozen"] = not any(p.requires_grad for p in self._image_params())

    def on_fit_start(self):
        if self.stage == "ft":
            seen["start_of_ft"] = self.head.weight.detach().clone()

    monkeypatch.setattr(LPFT, "start_round", spy)
    monkeypatch.setattr(LPFT, "on_fit_start", on_fit_start)
    record = run(
        compose_train(
            [
                "experiment=lp_ft_robust_shapes",
                f"paths.log_dir={tmp_path}",
                "logger=csv",
                "progress_bar=false",
                "trainer.max_steps=4",
                "method.scheduler.warmup_steps=1",
                *SMALL,
            ]
        )
    )
    assert seen["image_frozen"] and seen["image_trains"]
    assert torch.equal(seen["end_of_lp"], seen["start_of_ft"])
    assert [r["round"] for r in record["rounds"]] == [0, 1]  # the LP stage's metrics are kept


def _quick(tmp_path: Path, experiment: str, *extra: str) -> dict:
    return run(
        compose_train(
            [
                f"experiment={experiment}",
                f"paths.log_dir={tmp_path}",
                "logger=csv",
                "progress_bar=false",
                *SMALL,
                *extra,
            ]
        )
    )


def test_lbfgs_probe_chooses_c_on_the_val_split(tmp_path: Path) -> None:
    over = ["method.solver=lbfgs", "method.post_hoc=true", "method.lbfgs_c_grid=[0.1,100.0,3]"]
    with pytest.raises(ReprolabError, match="data.val=true"):
        _quick(tmp_path / "a", "lp_robust_shapes", *over)
    record = _quick(tmp_path / "b", "lp_robust_shapes", *over, "data.val=true")
    m = record["metrics"]
    assert min(abs(m["lp/lbfgs_C"] - c) for c in (0.1, 10**0.5, 100.0)) < 1e-6
    assert m["test/acc"] > 30  # 10 classes: far above chance from 64 images


def test_carot_trains_every_term_and_evaluates_with_its_own_text_head(tmp_path: Path) -> None:
    record = _quick(
        tmp_path,
        "carot_robust_shapes",
        "trainer.max_steps=3",
        "method.scheduler.warmup_steps=1",
        "method.ema_every=1",
        "trainer.log_every_n_steps=1",
    )
    assert record["status"] == "finished"
    csv = next(Path(record_dir := tmp_path).rglob("metrics.csv")).read_text()
    for key in ("train/mcl", "train/oc", "train/cf", "train/sd", "train/ema_momentum"):
        assert key in csv, (key, record_dir)
    assert record["metrics"]["params/trainable"] == record["metrics"]["params/total"]


def test_finetune_augment_is_a_mild_random_crop_without_flip() -> None:
    from PIL import Image

    from reprolab.data.transforms import Preprocess, build_transforms

    pre = Preprocess(16, (0.5,) * 3, (0.5,) * 3)
    tf = build_transforms(pre, True, "finetune")
    names = [type(t).__name__ for t in tf.transforms]
    assert names[0] == "RandomResizedCrop" and "RandomHorizontalFlip" not in names
    assert tuple(tf.transforms[0].scale) == (0.9, 1.0)
    assert tf(Image.new("RGB", (40, 30))).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="train_augment"):
        build_transforms(pre, True, "flip")


def test_lp_ft_from_a_missing_lp_run_names_the_command_that_makes_it(tmp_path: Path) -> None:
    missing = tmp_path / "carot_neurips24.tiny.lp.robust_shapes" / "seed3"
    with pytest.raises(SourceRunError) as e:
        _quick(
            tmp_path,
            "lp_ft_robust_shapes",
            f"+method.source.run_dir={missing}",
            "+method.source.experiment=lp_robust_shapes",
        )
    assert "python train.py experiment=lp_robust_shapes seed=3" in str(e.value)
