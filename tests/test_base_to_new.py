"""CoCoOp's base-to-new protocol: the class split, relabelling, new-class evaluation and HM.

References: the class split is recomputed by hand (sorted ids, ceil(K/2)); the new-class accuracy of
a base-to-new run is checked against a separate run on the new classes alone (`subsample_classes=new`);
the HM against its formula.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from reprolab.data.classsplit import ClassSubset, base_new_classes, relabel_map
from reprolab.data.datamodule import ClassificationDataModule
from reprolab.data.info import TaskInfoError
from reprolab.data.info import TestSet as Set
from reprolab.data.spec import ImageSplit
from reprolab.errors import ConfigValueError
from reprolab.methods.base import base_new_summary, harmonic_mean


def test_class_halves_sorted_ceil_and_relabelled() -> None:
    labels = [7, 3, 3, 9, 1, 5, 7, 0, 2]  # ids present: 0 1 2 3 5 7 9 (K = 7)
    base, new = base_new_classes(labels)
    assert base == [0, 1, 2, 3] and new == [5, 7, 9]  # ceil(7 / 2) = 4 base classes
    assert relabel_map(new) == {5: 0, 7: 1, 9: 2}
    split = ImageSplit(lambda i: None, labels, groups=list(range(len(labels))))

    class Built(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.split = split

        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> dict:
            return {"image": i, "label": labels[i], "index": i}

    sub = ClassSubset(Built(), new)
    items = [sub[j] for j in range(len(sub))]
    assert [it["image"] for it in items] == [0, 3, 5, 6]  # the items of classes 5, 7, 9
    assert [it["label"] for it in items] == [1, 2, 0, 1]
    assert sub.split.labels == [1, 2, 0, 1] and sub.split.groups == [0, 3, 5, 6]


def _dm(subsample: str, **kw) -> ClassificationDataModule:
    return ClassificationDataModule(
        "shapes",
        "shapes",
        subsample_classes=subsample,
        num_shots=4,
        fewshot_seed=3,
        train_augment=False,
        **kw,
    )


def test_base_to_new_data_module_splits_and_info() -> None:
    from reprolab.data.transforms import Preprocess

    full = _dm("all")
    b2n = _dm("base_to_new")
    names = full.classnames
    info = b2n.info
    assert info.classnames == tuple(names[:5])
    assert [(t.name, t.role) for t in info.test_sets] == [("base", "id"), ("new", "new")]
    assert info.test_sets[1].classnames == tuple(names[5:])
    pre = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for dm in (full, b2n):
        dm.configure(preprocess=pre)
        dm.setup("fit")
    # The base train subset is the all-class k-shot subset restricted to base classes (same seed).
    full_train = full._splits["train"].split.labels
    kept = [y for y in full_train if y < 5]
    assert b2n._splits["train"].split.labels == kept
    assert len(kept) == 4 * 5
    base_img = b2n._splits["train"][0]["image"]
    first_base = next(i for i, y in enumerate(full_train) if y < 5)
    assert torch.equal(base_img, full._splits["train"][first_base]["image"])
    test = full._splits["test:test"].split.labels
    assert len(b2n._splits["test:base"]) == sum(y < 5 for y in test)
    assert b2n._splits["test:new"].split.labels == [y - 5 for y in test if y >= 5]
    assert len(b2n.test_dataloader()) == 2


def test_bad_subsample_and_several_test_sets_fail_in_one_line() -> None:
    with pytest.raises(ConfigValueError, match="subsample_classes must be one of"):
        _dm("half")
    with pytest.raises(ConfigValueError, match="first test set only"):
        _dm("base_to_new", test_sets=["test", "test_clutter"])


def test_hm_and_summary() -> None:
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    sets = [Set("base", "id"), Set("new", "new", classnames=("a",))]
    out = base_new_summary({"test/base/acc": 70.0, "test/new/acc": 50.0}, sets)
    assert out == {"test/base_acc": 70.0, "test/new_acc": 50.0, "test/hm": 2 * 70 * 50 / 120}
    assert base_new_summary({"test/base/acc": 70.0}, sets[:1]) == {}
    with pytest.raises(ValueError, match="needs its own classnames"):
        Set("new", "new")


@pytest.fixture(scope="module")
def tiny_backbone():
    from reprolab.models.clip import CLIPBackbone
    from reprolab.models.tiny_clip import TINY_CLIP_ARCH, weights_path

    return CLIPBackbone("tiny_clip", TINY_CLIP_ARCH, pretrained=str(weights_path()))


def _test(method, dm) -> dict:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    return trainer.test(method, datamodule=dm, verbose=False)[0]


def test_zeroshot_new_classes_equal_a_run_on_the_new_half(tiny_backbone) -> None:
    """The `new` set of a base-to-new run is scored exactly as a run on the new classes alone."""
    from reprolab.methods.zeroshot import ZeroShot

    out = {}
    for subsample in ("base_to_new", "new", "base"):
        dm = _dm(subsample, eval_batch_size=500, val=False)
        method = ZeroShot(name="zeroshot", model=tiny_backbone, info=dm.info)
        dm.configure(**method.data_requirements())
        out[subsample] = _test(method, dm)
    b2n = out["base_to_new"]
    assert b2n["test/new/acc"] == pytest.approx(out["new"]["test/acc"], abs=1e-4)
    assert b2n["test/base/acc"] == pytest.approx(out["base"]["test/acc"], abs=1e-4)
    assert b2n["test/new/nll"] == pytest.approx(out["new"]["test/nll"], rel=1e-4)
    b, n = b2n["test/base_acc"], b2n["test/new_acc"]
    assert b2n["test/hm"] == pytest.approx(2 * b * n / (b + n), rel=1e-6)
    assert not math.isclose(b, n)  # the two halves really are different sets


def test_a_method_without_class_names_refuses_new_classes(tiny_backbone) -> None:
    from reprolab.methods.linear_probe import LinearProbe

    dm = _dm("base_to_new")
    with pytest.raises(TaskInfoError, match="new-class test set"):
        LinearProbe(name="linear_probe", model=tiny_backbone, info=dm.info)


def test_per_image_time_is_wall_time_over_images_seen() -> None:
    from reprolab.callbacks import Throughput

    t = Throughput()
    t.samples = {"train": 400, "test": 50}
    t.seconds = {"train": 2.0, "test": 0.5}
    out = t.metrics()
    assert out["train/sec_per_image"] == pytest.approx(2.0 / 400)
    assert out["test/sec_per_image"] == pytest.approx(0.5 / 50)
    assert "train/peak_mem_gb" not in out  # CPU: no allocator peak to report
    t.peak_mem_gb = 1.25
    assert t.metrics()["train/peak_mem_gb"] == 1.25


def test_prompt_methods_and_class_subsets_share_one_feature_cache(tiny_backbone, tmp_path) -> None:
    """Zero-shot and CoOp ask for the same cached features; a base-to-new run reads the files an
    all-class run wrote (subsets are taken after the cache), so the tower encodes each split once."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from reprolab.methods.zeroshot import ZeroShot

    def dm(subsample: str) -> ClassificationDataModule:
        return ClassificationDataModule(
            "shapes",
            "shapes",
            root=str(tmp_path),
            subsample_classes=subsample,
            num_shots=2,
            fewshot_seed=1,
            train_augment=False,
            val=False,
            test_sets=["test"],
        )

    zs = ZeroShot(
        name="zeroshot", model=tiny_backbone, info=dm("all").info, cache_image_features=True
    )
    coop_cfg = OmegaConf.load("configs/method/coop.yaml")
    coop = instantiate(coop_cfg, cache_image_features=True, ctx_init="a photo of a")(
        model=tiny_backbone, info=dm("base_to_new").info
    )
    a, b = zs.data_requirements()["features"], coop.data_requirements()["features"]
    assert a == b  # same key parts: one cache entry for both methods
    calls = {"n": 0}
    encode = a.encode

    def counted(x):
        calls["n"] += 1
        return encode(x)

    from dataclasses import replace

    source = replace(a, encode=counted)
    full = dm("all")
    full.configure(preprocess=tiny_backbone.preprocess, features=source)
    full.setup("fit")
    built = calls["n"]
    assert built > 0
    b2n = dm("base_to_new")
    b2n.configure(preprocess=tiny_backbone.preprocess, features=source)
    b2n.setup("fit")
    assert calls["n"] == built  # nothing re-encoded
    assert len(list((tmp_path / "features" / "shapes").glob("*.pt"))) == 2  # train, test
    item = b2n._splits["test:new"][0]
    assert item["image"].shape == (128,) and 0 <= int(item["label"]) < 5


def test_prepare_data_builds_the_feature_cache_and_setup_reads_it(tiny_backbone, tmp_path) -> None:
    """Lightning runs `prepare_data` on local rank 0 only: it encodes; `setup` (every rank) reads."""
    from dataclasses import replace

    from reprolab.data.feature_cache import FeatureSource

    calls = {"n": 0}
    src = FeatureSource.of(tiny_backbone)
    encode = src.encode

    def counted(x):
        calls["n"] += 1
        return encode(x)

    def dm() -> ClassificationDataModule:
        m = ClassificationDataModule(
            "shapes",
            "shapes",
            root=str(tmp_path),
            num_shots=2,
            train_augment=False,
            val=False,
            test_sets=["test"],
        )
        m.configure(preprocess=tiny_backbone.preprocess, features=replace(src, encode=counted))
        return m

    rank0 = dm()
    rank0.prepare_data()
    built = calls["n"]
    assert built > 0 and len(list((tmp_path / "features" / "shapes").glob("*.pt"))) == 2
    rank0.setup("fit")  # already built in prepare_data
    other = dm()
    other.setup("fit")  # another rank: reads the files
    assert calls["n"] == built
    assert torch.equal(other._splits["train"][0]["image"], rank0._splits["train"][0]["image"])
