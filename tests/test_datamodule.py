"""ClassificationDataModule: cached k-shot train + CoOp val subset, synthetic specs, and
per-test-set label spaces (ImageNet-A/R, ObjectNet under a 1000-way ImageNet head)."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from reprolab.data import fewshot
from reprolab.data.datamodule import ClassificationDataModule
from reprolab.data.datasets import imagenet as inet
from reprolab.data.fewshot import FewShotError, fewshot_splits, sample_fewshot
from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.data.spec import get_spec
from reprolab.data.transforms import Preprocess
from reprolab.methods.base import ClassificationMethod

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_data_tree import decode_index, make_coop_tree, make_imagenet_tree  # noqa: E402

# Identity normalisation, nearest resizing: tensors hold pixel / 255, so `decode_index` is exact.
PRE = Preprocess(image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")
SHIFTS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "objectnet"]

R_IDX = inet.subset_indices("imagenet_r")
R_POS = {i: r for r, i in enumerate(R_IDX)}
OUTSIDE_R = min(set(range(1000)) - set(R_IDX))  # an ImageNet class that ImageNet-R does not have


def _labels(loader) -> list[int]:
    return list(loader.dataset.split.labels)


def _dm(root: Path, dataset: str, **kw) -> ClassificationDataModule:
    kw = {"num_shots": 2, "fewshot_seed": 3, "eval_batch_size": 500, **kw}
    dm = ClassificationDataModule(dataset, dataset, root=str(root), **kw)
    dm.set_preprocess(PRE)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------
# k-shot train + CoOp val subset, cached next to the data


def test_real_dataset_kshot_train_and_coop_val_subset_cached(tmp_path, monkeypatch):
    make_coop_tree(tmp_path, "dtd", per_class=(5, 6, 1), size=8)
    dm = _dm(tmp_path, "dtd", val=True)
    train, val = _labels(dm.train_dataloader()), _labels(dm.val_dataloader())
    assert Counter(train) == dict.fromkeys(range(47), 2)
    assert Counter(val) == dict.fromkeys(range(47), 2)  # CoOp: min(k, 4) per class
    assert (tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_3.json").is_file()
    ref = fewshot_splits(get_spec("dtd"), tmp_path, 2, 3)
    assert train == ref["train"].labels and val == ref["val"].labels

    def boom(*a, **k):
        raise AssertionError("resampled although the cache matches")

    monkeypatch.setattr(fewshot, "fewshot_indices", boom)
    again = _dm(tmp_path, "dtd", val=True)
    assert dm.train_dataloader().dataset.split.labels == _labels(again.train_dataloader())
    monkeypatch.undo()

    k8 = _dm(tmp_path, "dtd", num_shots=8, val=True)
    assert Counter(_labels(k8.val_dataloader())) == dict.fromkeys(range(47), 4)
    # every class has 5 < 8 images: nothing would be few-shot, so training on it is refused
    with pytest.raises(FewShotError, match="num_shots=8 exceeds the largest class of dtd train"):
        k8.train_dataloader()
    full = _dm(tmp_path, "dtd", num_shots=None, val=True)
    assert len(full.train_dataloader().dataset) == 47 * 5
    assert len(full.val_dataloader().dataset) == 47 * 6  # num_shots: null keeps whole splits
    no_val = _dm(tmp_path, "dtd", val=False)
    assert no_val.val_dataloader() == [] and _labels(no_val.train_dataloader()) == train
    assert dm.test_index_groups == {"test": None}


def test_synthetic_spec_kshot_without_a_data_folder(tmp_path):
    dm = _dm(tmp_path, "shapes", num_shots=4, fewshot_seed=1, val=True)
    spec = get_spec("shapes")
    train = spec.load(tmp_path, "train")
    idx = sample_fewshot(train.labels, 4, 1)
    assert _labels(dm.train_dataloader()) == [train.labels[i] for i in idx]
    assert len(dm.val_dataloader().dataset) == len(spec.load(tmp_path, "val"))  # val kept whole
    assert not list(tmp_path.iterdir())  # nothing cached: synthetic data has no folder
    assert dm.test_index_groups == {"test": None, "test_clutter": None}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 4, 4)


def _batches(loader) -> list[dict]:
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]


def test_cache_images_serves_the_uncached_batches_and_is_reused_in_process(tmp_path, monkeypatch):
    from reprolab.data import datamodule as dmod

    monkeypatch.setattr(dmod, "_SPLIT_CACHE", dmod.OrderedDict())
    kw = {"num_shots": 4, "fewshot_seed": 1, "val": True, "train_augment": False}
    plain = _dm(tmp_path, "shapes", **kw)
    cached = _dm(tmp_path, "shapes", cache_images=True, **kw)
    for a, b in (
        (plain.train_dataloader(), cached.train_dataloader()),
        (plain.val_dataloader(), cached.val_dataloader()),
        (plain.test_dataloader()[1], cached.test_dataloader()[1]),
    ):
        for x, y in zip(_batches(a), _batches(b), strict=True):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
    assert isinstance(cached._splits["train"], dmod._Materialized)
    # a second data module of the same key reuses the tensors; another seed's k-shot does not
    again = _dm(tmp_path, "shapes", cache_images=True, **kw)
    assert again._splits["val"] is cached._splits["val"]
    other = ClassificationDataModule(
        "shapes", "shapes", root=str(tmp_path), cache_images=True, **{**kw, "fewshot_seed": 2}
    )
    other.set_preprocess(PRE)
    assert other._cache_key() != cached._cache_key() == again._cache_key()
    # augmented train items are random: transformed on the fly, never cached
    aug = _dm(
        tmp_path, "shapes", cache_images=True, **{**kw, "train_augment": True}, test_sets=["test"]
    )
    assert isinstance(aug._splits["train"], dmod._Transformed)
    assert isinstance(aug._splits["test:test"], dmod._Materialized)
    assert len(dmod._SPLIT_CACHE) <= dmod._SPLIT_CACHE_SIZE


# ------------------------------------------------------------------------------------------------
# Per-test-set label spaces


def fake_logits(indices: list[int]) -> torch.Tensor:  # (B, 1000)
    """5 for the image's own ImageNet class; for ImageNet-R classes at even rank r, 10 for a class
    outside ImageNet-R (wrong among 1000 classes, dropped by the projection); at rank r = 1 mod 4,
    7 for R's next class (wrong either way)."""
    out = torch.zeros(len(indices), 1000)
    for b, i in enumerate(indices):
        out[b, i] = 5.0
        r = R_POS.get(i)
        if r is not None and r % 2 == 0:
            out[b, OUTSIDE_R] = 10.0
        elif r is not None and r % 4 == 1:
            out[b, R_IDX[r + 1]] = 7.0
    return out


class FakeImageNetModel(ClassificationMethod):
    """A 1000-way ImageNet classifier that reads the class off the pixels (`index_image`)."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return fake_logits(decode_index(images))


@pytest.fixture(scope="module")
def inet_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    return root, make_imagenet_tree(root, size=8)["objectnet"]


def _test(dm: ClassificationDataModule) -> dict[str, float]:
    method = FakeImageNetModel(name="fake", model=None, info=dm.info)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    out: dict[str, float] = {}
    for r in trainer.test(method, datamodule=dm, verbose=False):
        out.update({k: float(v) for k, v in r.items()})
    return out


def test_imagenet_r_accuracy_and_ece_on_projected_logits(inet_tree):
    root, _ = inet_tree
    dm = ClassificationDataModule(
        "imagenet",
        "imagenet",
        root=str(root),
        dataset_kwargs={"shift_sets": ["imagenet_r"]},
        eval_batch_size=500,
        val=False,
    )
    dm.set_preprocess(PRE)
    assert dm.test_index_groups == {"test": None, "imagenet_r": [[i] for i in R_IDX]}
    m = _test(dm)
    # ImageNet (1000-way, no projection): the 100 even ranks and 50 ranks 1 mod 4 of R are wrong.
    assert m["test/test/acc"] == pytest.approx(100 * 850 / 1000) == m["test/acc"]
    # ImageNet-R (200 columns kept): even ranks become right; the 50 ranks 1 mod 4 stay wrong.
    assert m["test/imagenet_r/acc"] == pytest.approx(75.0)
    # ECE over the 200-way softmax: right rows have confidence e^5 / (e^5 + 199) (bin 7 of 15),
    # wrong rows e^7 / (e^7 + e^5 + 198) (bin 12); the out-of-set logit 10 plays no part.
    right = math.exp(5) / (math.exp(5) + 199)
    wrong = math.exp(7) / (math.exp(7) + math.exp(5) + 198)
    assert m["test/imagenet_r/ece"] == pytest.approx(0.75 * (1 - right) + 0.25 * wrong, abs=1e-5)


def test_every_shift_set_logged_in_its_own_label_space(inet_tree):
    root, objectnet_rows = inet_tree
    dm = ClassificationDataModule(
        "imagenet",
        "imagenet",
        root=str(root),
        dataset_kwargs={"shift_sets": SHIFTS},
        eval_batch_size=500,
        val=False,
    )
    dm.set_preprocess(PRE)
    groups = dm.test_index_groups
    assert list(groups) == ["test", *SHIFTS]
    assert groups["test"] is groups["imagenet_v2"] is groups["imagenet_sketch"] is None
    assert groups["imagenet_a"] == [[i] for i in inet.subset_indices("imagenet_a")]
    assert groups["objectnet"] == [g for _, _, g in objectnet_rows]
    m = _test(dm)
    for name in ["test", *SHIFTS]:
        assert f"test/{name}/acc" in m and f"test/{name}/ece" in m, name
    assert m["test/imagenet_v2/acc"] == m["test/imagenet_sketch/acc"] == m["test/acc"] == 85.0
    assert m["test/imagenet_r/acc"] == pytest.approx(75.0)
    # ObjectNet: class k's image shows the last ImageNet class of its group; it is right when the
    # max of the fake logits over each group is largest for k (computed without project_logits).
    # Reading only each group's first column would be wrong for every 2- and 3-class group.
    right = first_only = 0
    for k, g in enumerate(groups["objectnet"]):
        row = fake_logits([g[-1]])[0].tolist()
        scores = [max(row[i] for i in grp) for grp in groups["objectnet"]]
        right += max(range(len(scores)), key=scores.__getitem__) == k
        first_only += max(range(len(scores)), key=lambda j: row[groups["objectnet"][j][0]]) == k
    assert first_only < right
    assert m["test/objectnet/acc"] == pytest.approx(100 * right / 113)


def test_method_checks_index_groups():
    def info(*sets: TestSet) -> ImageClassificationInfo:
        return ImageClassificationInfo(
            "x", classnames=("a", "b", "c"), templates=("{}",), test_sets=sets
        )

    m = ClassificationMethod(
        name="x", model=None, info=info(TestSet("test"), TestSet("sub", "shift", ((0,), (2, 1))))
    )
    assert [t["acc"].num_classes for t in m.test_metrics] == [3, 2]
    assert m.val_metrics["acc"].num_classes == 3
    with pytest.raises(ValueError, match="indices into the 3 classes"):
        ClassificationMethod(name="x", model=None, info=info(TestSet("test", "id", ((0,), (3,)))))
    with pytest.raises(ValueError, match="role 'odd'"):
        TestSet("test", "odd")
