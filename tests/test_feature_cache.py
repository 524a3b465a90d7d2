"""The persistent image-feature cache: keys, fingerprints, hits, rebuilds and foreign files."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from reprolab.data.feature_cache import (
    CachedFeatures,
    FeatureCache,
    FeatureDataset,
    FeatureKey,
    encode_split,
    split_key,
    state_fingerprint,
    transform_id,
)
from reprolab.data.transforms import Preprocess
from reprolab.errors import ConfigValueError

torch.set_num_threads(1)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
LOGGER = "reprolab.data.feature_cache"


def toy_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    ).eval()  # (B, 16)


def toy_split(n: int = 23, size: int = 8, groups: bool = True, index: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        item = {"image": torch.randn(3, size, size, generator=g), "label": i % 3}
        if groups:
            item["group"] = i % 4
        if index:
            item["index"] = i
        items.append(item)
    return items


def make_key(**changes) -> FeatureKey:
    key = FeatureKey(
        backbone="toy",
        pretrained="toy.pt",
        weights=state_fingerprint(toy_encoder()),
        dataset="shapes",
        dataset_kwargs={"seed": 0},
        split="train",
        transform=transform_id(Preprocess(8, MEAN, STD), train=True, augment=False),
        shots=4,
        seed=1,
    )
    return replace(key, **changes)


class Counter:
    """A `build` callable that encodes the toy split and counts its calls."""

    def __init__(self, n: int = 23) -> None:
        self.calls, self.n = 0, n

    def __call__(self):
        self.calls += 1
        return encode_split(toy_encoder(), toy_split(self.n), batch_size=5)


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_build_then_hit_returns_identical_tensors(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    build, key = Counter(), make_key()
    first = FeatureCache(tmp_path).get_or_build(key, build)
    second = FeatureCache(tmp_path).get_or_build(key, build)  # a fresh process would do this
    assert build.calls == 1
    for a, b in [
        (first.features, second.features),
        (first.labels, second.labels),
        (first.groups, second.groups),
        (first.index, second.index),
    ]:
        assert torch.equal(a, b)
    assert second.features.dtype == torch.float32 and second.labels.dtype == torch.long
    assert second.key == key
    msgs = records(caplog)
    assert msgs[0].startswith("feature cache miss;") and "23 items" in msgs[0]
    assert (
        msgs[1].startswith("feature cache hit:")
        and str(FeatureCache(tmp_path).path(key)) in msgs[1]
    )
    path = FeatureCache(tmp_path).path(key)
    assert path.parent == tmp_path / "features" / "shapes"
    assert path.name == f"train-{key.fingerprint()[:16]}.pt"
    assert path.with_suffix(".json").is_file() and (path.parent / "index.json").is_file()
    assert not list(path.parent.glob("*.tmp"))


def test_reused_across_methods_and_seeds(tmp_path: Path) -> None:
    cache, build = FeatureCache(tmp_path), Counter()
    # Two methods (say a linear probe and CLIP-Adapter) on the same k-shot split and seed.
    a = cache.get_or_build(make_key(), build)
    b = cache.get_or_build(make_key(), build)
    assert build.calls == 1 and torch.equal(a.features, b.features)
    # The full split (shots=None) does not depend on the seed: every seed reuses one file.
    full = [cache.get_or_build(make_key(shots=None, seed=s), build) for s in (1, 2, 3)]
    assert build.calls == 2
    assert {c.key.seed for c in full} == {None}
    assert len(list((tmp_path / "features" / "shapes").glob("*.pt"))) == 2


@pytest.mark.parametrize(
    "field, changes",
    [
        ("transform", {"transform": transform_id(Preprocess(16, MEAN, STD), True, False)}),
        ("weights", None),  # one perturbed parameter, below
        ("dataset_kwargs", {"dataset_kwargs": {"seed": 1}}),
        ("shots", {"shots": 8}),
        ("seed", {"seed": 2}),
    ],
)
def test_a_changed_key_builds_a_new_file_and_names_the_field(
    tmp_path: Path, caplog, field: str, changes: dict | None
) -> None:
    cache, build = FeatureCache(tmp_path), Counter()
    old = make_key()
    cache.get_or_build(old, build)
    if changes is None:
        enc = toy_encoder()
        with torch.no_grad():
            enc[0].weight[0, 0, 0, 0] += 1e-3
        changes = {"weights": state_fingerprint(enc)}
    new = make_key(**changes)
    assert new.fingerprint() != old.fingerprint()
    caplog.clear()
    caplog.set_level(logging.INFO, logger=LOGGER)
    cache.get_or_build(new, build)
    assert build.calls == 2
    assert cache.path(new) != cache.path(old) and cache.path(new).is_file()
    assert cache.path(old).is_file()  # the other key's features stay usable
    (msg,) = records(caplog)
    assert f"{field} changed (" in msg, msg
    others = {"transform", "weights", "dataset_kwargs", "shots", "seed"} - {field}
    assert not any(f"{o} changed" in msg for o in others), msg
    # Same (backbone, split, shots, seed): a rebuild; a new shot count or seed: a new variant.
    assert msg.startswith(
        "feature cache rebuilt:" if field not in ("shots", "seed") else "feature cache miss (new;"
    )
    if field == "weights":
        assert f"({old.weights[:12]} -> {new.weights[:12]})" in msg
    caplog.clear()
    cache.get_or_build(old, build)  # switching back is a hit
    assert build.calls == 2 and records(caplog)[0].startswith("feature cache hit:")


def test_a_file_made_for_another_key_is_never_used(tmp_path: Path, caplog) -> None:
    cache = FeatureCache(tmp_path)
    a, b = make_key(), make_key(seed=2)
    cache.get_or_build(a, Counter(n=7))
    shutil.copyfile(cache.path(a), cache.path(b))  # a hand-copied file, or a prefix collision
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert cache.load(b) is None
    assert "made for another key (seed changed (1 -> 2)); not used" in records(caplog)[-1]
    build = Counter(n=11)
    got = cache.get_or_build(b, build)
    assert build.calls == 1 and len(got) == 11
    assert cache.load(b) is not None and len(cache.load(b)) == 11  # rewritten for its own key


def test_an_unreadable_file_is_rebuilt(tmp_path: Path, caplog) -> None:
    cache, key = FeatureCache(tmp_path), make_key()
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"not a torch file")
    caplog.set_level(logging.INFO, logger=LOGGER)
    build = Counter()
    cache.get_or_build(key, build)
    assert build.calls == 1
    assert any("unreadable" in m for m in records(caplog))
    assert cache.load(key) is not None


def test_an_augmented_split_is_refused_in_one_line() -> None:
    pre = Preprocess(8, MEAN, STD)
    for augment in (True, "coop", "finetune"):
        with pytest.raises(ConfigValueError, match="cannot be cached") as err:
            transform_id(pre, train=True, augment=augment)
        assert "\n" not in str(err.value) and "train_augment=false" in str(err.value)
    assert transform_id(pre, True, False) == transform_id(pre, True, "none")
    assert transform_id(pre, True, False) != transform_id(pre, False, False)  # resize vs crop
    assert transform_id(pre, False, "coop") == transform_id(pre, False, False)  # eval: no augment


def test_encode_split_equals_a_direct_batched_computation() -> None:
    enc, items = toy_encoder(), toy_split(23)
    feats, labels, groups, index = encode_split(enc, items, batch_size=5)
    with torch.no_grad():
        direct = enc(torch.stack([it["image"] for it in items]))  # (23, 16)
    assert feats.shape == (23, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [it["label"] for it in items]
    assert groups.tolist() == [it["group"] for it in items]
    assert index.tolist() == list(range(23))
    assert not feats.requires_grad
    # Items without `group` or `index`: no groups, positions as the index.
    feats2, _, groups2, index2 = encode_split(enc, toy_split(9, groups=False, index=False), 4)
    assert groups2 is None and index2.tolist() == list(range(9)) and feats2.shape == (9, 16)


def test_state_fingerprint_tracks_every_parameter_and_only_the_weights() -> None:
    base = state_fingerprint(toy_encoder(0))
    assert len(base) == 64
    assert state_fingerprint(toy_encoder(0)) == base  # re-created with the same weights
    copy = toy_encoder(5)
    copy.load_state_dict(toy_encoder(0).state_dict())
    assert state_fingerprint(copy) == base
    assert state_fingerprint(toy_encoder(1)) != base
    for name, _ in toy_encoder(0).state_dict().items():
        enc = toy_encoder(0)
        with torch.no_grad():
            t = enc.state_dict()[name]  # shares storage with the parameter / buffer
            t.view(-1)[-1] += 1
        assert state_fingerprint(enc) != base, name


def test_feature_dataset_items_and_batches() -> None:
    feats, labels, groups, index = encode_split(toy_encoder(), toy_split(10), batch_size=4)
    ds = FeatureDataset(CachedFeatures(feats, labels, groups, index, make_key()))
    assert len(ds) == 10
    item = ds[3]
    assert set(item) == {"features", "label", "group", "index"}
    assert item["features"].shape == (16,) and int(item["index"]) == 3
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["features"].shape == (4, 16) and batch["label"].tolist() == labels[:4].tolist()
    assert ds.labels == labels.tolist() and ds.groups == groups.tolist()
    no_groups = FeatureDataset(CachedFeatures(feats, labels, None, index, make_key()))
    assert "group" not in no_groups[0] and no_groups.groups is None


def test_key_normalisation() -> None:
    assert make_key(shots=None, seed=7).seed is None
    assert make_key(dataset_kwargs={"b": 1.0, "a": [1, 2]}).dataset_kwargs == '{"a":[1,2],"b":1}'
    assert make_key(dataset_kwargs={"b": 1, "a": (1, 2)}) == make_key(
        dataset_kwargs={"a": [1, 2], "b": 1.0}
    )
    assert make_key().fingerprint() == make_key().fingerprint()
    assert hash(make_key()) == hash(make_key())


def test_split_key_of_a_data_module(tmp_path: Path) -> None:
    from reprolab.data.datamodule import ClassificationDataModule

    def dm(**kw) -> ClassificationDataModule:
        m = ClassificationDataModule(
            name="shapes", dataset="shapes", root=str(tmp_path), num_shots=2, fewshot_seed=3, **kw
        )
        m.configure(preprocess=Preprocess(8, MEAN, STD))
        return m

    plain = dm(train_augment=False)
    train = split_key(plain, "train", "toy", None, "w")
    assert (train.shots, train.seed, train.split) == (2, 3, "train")
    assert train.transform.endswith("train:none")
    test = split_key(plain, "test:test_clutter", "toy", None, "w")
    assert (test.split, test.shots, test.seed) == ("test_clutter", None, None)
    assert test.transform.endswith(" eval")
    assert split_key(plain, "val", "toy", None, "w").shots is None  # synthetic val: whole split
    with pytest.raises(ConfigValueError, match="cannot be cached"):
        split_key(dm(train_augment=True), "train", "toy", None, "w")
    assert split_key(dm(train_augment=True), "test", "toy", None, "w") == test.__class__(
        **{**test.to_dict(), "split": "test"}
    )
    # End to end on the real split: the cached features are the ones of the items served.
    plain.setup("fit")
    ds = plain.train_dataloader().dataset
    got = FeatureCache(tmp_path).get_or_build(
        train, lambda: encode_split(toy_encoder(), ds, batch_size=8)
    )
    assert len(got) == len(ds) == 20 and got.index.tolist() == list(range(20))
    assert got.labels.tolist() == [int(ds[i]["label"]) for i in range(20)]


def test_a_data_module_serves_cached_features_as_its_images(tmp_path: Path) -> None:
    """`configure(features=FeatureSource)`: every split is encoded once into the cache and served
    as `image` (D,), with the image split's labels; a second data module reuses the files; an
    augmented train split fails in one line."""
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.data.feature_cache import FeatureSource

    enc = toy_encoder()
    calls = {"n": 0}

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return enc(x)

    source = FeatureSource(backbone="toy", pretrained=None, weights="w0", encode=encode)

    def dm(features: bool, **kw) -> ClassificationDataModule:
        m = ClassificationDataModule(
            name="shapes",
            dataset="shapes",
            root=str(tmp_path),
            num_shots=2,
            fewshot_seed=3,
            train_augment=False,
            val=False,
            test_sets=["test"],
            **kw,
        )
        m.configure(
            preprocess=Preprocess(8, MEAN, STD), **({"features": source} if features else {})
        )
        m.setup("fit")
        return m

    images, feats = dm(False), dm(True)
    n_calls = calls["n"]
    assert n_calls > 0
    for split in ("train", "test:test"):
        a, b = images._splits[split], feats._splits[split]
        assert len(a) == len(b)
        for i in (0, len(a) - 1):
            with torch.no_grad():
                want = enc(a[i]["image"][None])[0]
            torch.testing.assert_close(b[i]["image"], want)
            assert int(b[i]["label"]) == int(a[i]["label"]) and int(b[i]["index"]) == i
    assert feats._splits["train"].split.labels == images._splits["train"].split.labels
    dm(True)
    assert calls["n"] == n_calls  # the second data module read the files
    with pytest.raises(ConfigValueError, match="train_augment") as e:
        m = ClassificationDataModule(
            name="shapes",
            dataset="shapes",
            root=str(tmp_path),
            num_shots=2,
            train_augment=True,
            val=False,
        )
        m.configure(preprocess=Preprocess(8, MEAN, STD), features=source)
        m.setup("fit")
    assert "\n" not in str(e.value)


def test_group_methods_ask_for_features_only_with_a_frozen_featurizer_and_unmixed_inputs() -> None:
    import functools

    from _group_helpers import Featurizer, toy_info

    from reprolab.data.feature_cache import FeatureSource
    from reprolab.methods.group.erm import ERM
    from reprolab.methods.group.mixup import Mixup

    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    m = ERM(
        name="erm", model=Featurizer("none"), info=toy_info(4), optimizer=sgd, feature_cache=True
    )
    req = m.data_requirements()
    assert isinstance(req["features"], FeatureSource) and req["features"].backbone == "toy"
    x = torch.randn(3, 4)
    assert torch.equal(m.image_features(x), x)  # features in, features out
    assert (
        "features"
        not in ERM(
            name="erm", model=Featurizer("none"), info=toy_info(4), optimizer=sgd
        ).data_requirements()
    )
    for cls, model, why in (
        (ERM, Featurizer("image"), "trains its featurizer"),
        (Mixup, Featurizer("none"), "mixes its inputs"),
    ):
        with pytest.raises(ConfigValueError, match=why) as e:
            cls(
                name=cls.__name__.lower(),
                model=model,
                info=toy_info(4),
                optimizer=sgd,
                feature_cache=True,
            )
        assert "\n" not in str(e.value)
