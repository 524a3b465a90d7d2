"""Synthetic Waterbirds-like vector data (reprolab.data.vector_groups) and the MLP featurizer.

Spec robustness_ood_prompting.md §1.8 (group_synth) and §2.5 (group_synth_two_core): split sizes and
group proportions, determinism from `data_seed`, the masked test set, the batches the
classification methods read, the MLP's backbone interface, and short end-to-end runs through the
runner that log worst-group accuracy per test set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reprolab.data.info import ImageClassificationInfo
from reprolab.data.transforms import Preprocess
from reprolab.data.vector_groups import (
    VectorGroupDataModule,
    VectorInput,
    group_counts,
    load_vector_dataset,
)
from reprolab.errors import ConfigValueError
from reprolab.models.mlp import MLPFeaturizer

SMALL = {"n_train": 800, "n_val": 200, "n_test": 400}


@pytest.fixture(scope="module")
def synth():
    return load_vector_dataset("group_synth")


@pytest.fixture(scope="module")
def two_core():
    return load_vector_dataset("group_synth_two_core")


def _props(split) -> np.ndarray:
    return np.bincount(split["group"].numpy(), minlength=4) / len(split["group"])


def test_split_sizes_and_group_proportions(synth) -> None:
    sizes = {k: len(v["label"]) for k, v in synth.splits.items()}
    assert sizes == {"train": 4795, "val": 1199, "test": 5794}
    assert synth.feature_dim == 16 and synth.num_groups == 4
    train = _props(synth.splits["train"])
    np.testing.assert_allclose(train, [0.475, 0.025, 0.025, 0.475], atol=0.002)
    for split in ("val", "test"):
        assert np.allclose(_props(synth.splits[split]), 0.25, atol=0.002)  # P(a = y) = 0.5
    assert group_counts(4795, 0.95) == [2277, 120, 120, 2278]
    s = synth.splits["train"]
    assert torch.equal(s["group"], 2 * s["label"] + (s["group"] % 2))  # g = 2y + a
    assert s["label"].float().mean().item() == pytest.approx(0.5, abs=0.001)


def test_features_follow_the_generative_model(synth) -> None:
    s = synth.splits["test"]
    x, y, a = s["image"], s["label"], s["group"] % 2
    sl = synth.feature_slices
    assert (sl["core0"], sl["spurious"], sl["noise"]) == (slice(0, 2), slice(2, 3), slice(3, 16))
    assert torch.equal(x[:, 2], (2 * a - 1).float())  # z_s = ±1 (spurious_std 0)
    core = x[:, 0]
    assert core[y == 1].mean() == pytest.approx(1.5, abs=0.06)
    assert core[y == 0].mean() == pytest.approx(-1.5, abs=0.06)
    assert abs(float(x[:, 1].mean())) < 0.06 and abs(float(x[:, 3:].mean())) < 0.02
    bayes = ((core > 0).long() == y).float().mean().item()  # y = sign(z_c1), Φ(1.5) = 0.933
    assert bayes == pytest.approx(0.933, abs=0.015)


def test_determinism_and_independent_splits() -> None:
    a = load_vector_dataset("group_synth", **SMALL)
    b = load_vector_dataset("group_synth", **SMALL)
    for split in a.splits:
        for key in a.splits[split]:
            assert torch.equal(a.splits[split][key], b.splits[split][key]), (split, key)
    c = load_vector_dataset("group_synth", **SMALL, data_seed=1)
    assert not torch.equal(a.splits["train"]["image"], c.splits["train"]["image"])
    d = load_vector_dataset("group_synth", **{**SMALL, "n_test": 100})
    assert torch.equal(a.splits["train"]["image"], d.splits["train"]["image"])  # own stream


def test_two_core_masked_test_set(two_core) -> None:
    assert list(two_core.roles.items()) == [("test", "id"), ("test_masked", "shift")]
    sl = two_core.feature_slices
    assert (sl["core0"], sl["core1"], sl["spurious"]) == (slice(0, 2), slice(2, 4), slice(4, 5))
    assert two_core.feature_dim == 16
    test, masked = two_core.splits["test"], two_core.splits["test_masked"]
    assert torch.all(masked["image"][:, 0:2] == 0)
    assert torch.equal(masked["image"][:, 2:], test["image"][:, 2:])
    assert torch.all(test["image"][:, 0:2].abs().sum(1) > 0)  # the unmasked set is untouched
    for key in ("label", "group", "index"):
        assert torch.equal(masked[key], test[key])
    y = test["label"]
    assert test["image"][y == 1, 0].mean() == pytest.approx(3.0, abs=0.06)
    assert test["image"][y == 1, 2].mean() == pytest.approx(1.5, abs=0.06)
    plain = load_vector_dataset("group_synth_two_core", **SMALL, mask_core_at_test=False)
    assert list(plain.roles) == ["test"]
    with pytest.raises(ConfigValueError, match="masked_core=2"):
        load_vector_dataset("group_synth_two_core", **SMALL, masked_core=2)


def _dm(**kw) -> VectorGroupDataModule:
    args = {"name": "group_synth", "dataset": "group_synth", "dataset_kwargs": SMALL, **kw}
    return VectorGroupDataModule(**args)


def test_batches_and_info() -> None:
    dm = _dm(batch_size=64, eval_batch_size=150, shuffle_seed=3)
    info = dm.info
    assert isinstance(info, ImageClassificationInfo) and info.num_groups == 4
    assert info.num_classes == 2 and info.templates and info.test_set_names == ["test"]
    dm.configure(preprocess=VectorInput(16))
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "group", "index"}
    assert batch["image"].shape == (64, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["group"].dtype == torch.long
    assert torch.equal(batch["label"], batch["group"] // 2)
    assert len(loader) == 800 // 64  # the last incomplete batch is dropped
    tests = dm.test_dataloader()
    assert len(tests) == 1 and [len(b["label"]) for b in tests[0]] == [150, 150, 100]
    assert len(dm.val_dataloader()) == 2
    # The order depends on (shuffle_seed, epoch) only.
    again = _dm(batch_size=64, eval_batch_size=150, shuffle_seed=3)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))["index"], batch["index"])
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["index"], batch["index"])
    assert _dm(val=False).val_dataloader() == []


def test_group_balanced_sampling() -> None:
    dm = _dm(batch_size=100, sampler="group_balanced")
    dm.setup("fit")
    groups = torch.cat([b["group"] for b in dm.train_dataloader()])
    props = np.bincount(groups.numpy(), minlength=4) / len(groups)
    assert np.allclose(props, 0.25, atol=0.06)  # minority groups 2.5 % of the rows, 25 % drawn
    with pytest.raises(ConfigValueError, match="sampler"):
        _dm(sampler="balanced")


def test_configure_rejects_image_models_and_wrong_width() -> None:
    dm = _dm()
    with pytest.raises(ConfigValueError, match="model=mlp_featurizer"):
        dm.configure(preprocess=Preprocess(224, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ConfigValueError, match="model.input_dim=16"):
        dm.configure(preprocess=VectorInput(8))
    with pytest.raises(ValueError, match="caption_pairs"):
        dm.configure(caption_pairs=True)
    with pytest.raises(ConfigValueError, match="group_synth_two_core"):
        load_vector_dataset("group_synth_two_cores")
    with pytest.raises(ConfigValueError, match="test_masked"):
        _dm(test_sets=["test_masked"])


def test_mlp_featurizer_interface() -> None:
    torch.manual_seed(0)
    m = MLPFeaturizer("mlp_featurizer", input_dim=16, hidden_dim=32, feature_dim=16)
    assert m.preprocess == VectorInput(16) and m.feature_dim == 16 and m.trainable == "image"
    h = m.encode_image(torch.randn(5, 16))
    assert h.shape == (5, 16) and h.requires_grad
    assert [obj for _, obj in m.parts()["image"]] == [m.net] and not m.parts()["text"]
    assert m.frozen_state_prefixes() == [] and not m.text_trainable
    head = m.zeroshot_weights(["negative", "positive"], ["a {} example."])
    assert head.shape == (2, 16) and torch.isnan(head).all()  # shape only: no text tower
    with pytest.raises(ConfigValueError, match="head_init=random"):
        _ = m.logit_scale
    with pytest.raises(ConfigValueError, match="head_init=random"):
        m.encode_text(["a positive example."])
    frozen = MLPFeaturizer("mlp_featurizer", trainable="none", dropout=0.5)
    frozen.train()
    assert not frozen.training and frozen.frozen_state_prefixes() == [""]
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ConfigValueError, match="no text tower"):
        MLPFeaturizer("mlp_featurizer", trainable="both")


def test_hidden_dim_0_is_the_identity_and_a_group_head_trains_on_the_raw_inputs() -> None:
    from reprolab.methods.group.groupdro import GroupDRO

    m = MLPFeaturizer("linear_input", input_dim=16, hidden_dim=0, feature_dim=16, trainable="none")
    x = torch.randn(5, 16)
    assert torch.equal(m.encode_image(x), x) and not list(m.parameters())
    assert m.zeroshot_weights(["n", "p"], ["{}"]).shape == (2, 16)  # no parameter to ask a device
    info = ImageClassificationInfo(name="g", classnames=("n", "p"), templates=("{}",), num_groups=4)
    method = GroupDRO(name="groupdro", model=m, info=info, optimizer=torch.optim.SGD)
    method.head = method.build_head("random")
    assert method.head.weight.shape == (2, 16)
    assert method.param_counts()["params/trainable"] == 2 * 16 + 2  # the linear model alone
    with pytest.raises(ConfigValueError, match="feature_dim must equal input_dim") as e:
        MLPFeaturizer("linear_input", input_dim=16, hidden_dim=0, feature_dim=8)
    assert "\n" not in str(e.value)


def test_finetune_method_builds_on_the_mlp() -> None:
    """`FineTune` (the group methods' base) accepts the MLP: trainable mode, head, logits."""
    from reprolab.methods.finetuning.ft import FineTune

    dm = _dm()
    torch.manual_seed(0)
    model = MLPFeaturizer("mlp_featurizer", trainable="image")
    method = FineTune(name="ft", model=model, info=dm.info, head_init="random")
    dm.configure(**method.data_requirements())
    method.setup("fit")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    logits = method.logits(batch["image"])
    assert logits.shape == (108, 2) and torch.isfinite(logits).all()
    assert all(p.requires_grad for p in model.parameters())
    zs = FineTune(name="ft", model=model, info=dm.info, head_init="zeroshot")
    with pytest.raises(ConfigValueError, match="method.head_init=random"):
        zs.setup("fit")


def _run(overrides: list[str], tmp_path) -> dict[str, float]:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=mlp_featurizer",
            "+trainer.max_steps=20",
            "logger=csv",
            "progress_bar=false",
            "threads=1",
            f"paths.log_dir={tmp_path}",
            *overrides,
        ]
    )
    return run(cfg)["metrics"]


def test_ft_end_to_end_logs_worst_group_accuracy(tmp_path) -> None:
    metrics = _run(
        [
            "method=ft",
            "data=group_synth",
            "method.head_init=random",
            "method.optimizer.lr=1e-2",
            "method.scheduler.warmup_steps=2",
        ],
        tmp_path,
    )
    for key in ("test/test/acc", "test/test/worst_group_acc", "test/test/avg_group_acc"):
        assert key in metrics, sorted(metrics)
    assert metrics["test/test/worst_group_acc"] <= metrics["test/test/avg_group_acc"]
    assert metrics["test/test/acc"] > 60  # 20 steps already learn something (chance: 50)


def test_linear_probe_two_core_reports_both_test_sets(tmp_path) -> None:
    metrics = _run(
        ["method=linear_probe", "data=group_synth_two_core", "method.init=random"], tmp_path
    )
    for t in ("test", "test_masked"):
        assert f"test/{t}/worst_group_acc" in metrics, sorted(metrics)
    assert metrics["params/trainable"] == 2 * 16 + 2  # the head only: the MLP stays frozen


def test_zeroshot_head_on_the_mlp_fails_in_one_line(tmp_path) -> None:
    with pytest.raises(ConfigValueError, match="method.head_init=random") as err:
        _run(["method=ft", "data=group_synth"], tmp_path)
    assert "\n" not in str(err.value)
