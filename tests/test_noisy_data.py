"""Noisy-label data for NPC (robustness_ood_prompting.md §4.4; `reprolab.data.noisy`,
`reprolab.data.datasets.noisy`): the noise generators against their definitions and an independent
per-sample transcription of upstream's IDNX loop, determinism, the data modules' splits and batches,
and the real-data specs on miniature trees in their on-disk formats (torchvision's MNIST idx files,
CIFAR-10 python batches, Clothing1M's label files, Food-101N + Food-101's meta files)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from reprolab.data.datasets.noisy import (
    ASYM_MAPS,
    CIFAR10_CLASSES,
    read_idx,
    write_cifar_batch,
    write_idx,
)
from reprolab.data.noisy import (
    CLEAN_UNKNOWN,
    NoisyBlobsDataModule,
    NoisyClassificationDataModule,
    noisy_labels,
    transition_matrix,
)
from reprolab.data.spec import DataNotFoundError, get_spec
from reprolab.data.transforms import Preprocess
from reprolab.data.vector_groups import VectorInput
from reprolab.errors import ConfigValueError

PRE28 = Preprocess(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")  # cnn_mnist's
PRE32 = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")  # cnn9's


def empirical_transition(clean: np.ndarray, noisy: np.ndarray, k: int) -> np.ndarray:
    t = np.zeros((k, k))
    np.add.at(t, (clean, noisy), 1)
    return t / t.sum(axis=1, keepdims=True)


def close_to(emp: np.ndarray, t: np.ndarray, n_row: int) -> bool:
    """Every entry within 5 binomial standard deviations of T (plus a hair for exact zeros)."""
    return bool(np.all(np.abs(emp - t) <= 5 * np.sqrt(t * (1 - t) / n_row) + 1e-9))


# ------------------------------------------------------------------------------------------------
# The noise


def test_symmetric_noise_rate_and_uniform_off_diagonal():
    y = np.arange(100_000) % 10
    for r in (0.2, 0.5, 0.8):
        ny = noisy_labels(y, 10, "sym", r, seed=3)
        assert abs((ny != y).mean() - r) < 0.007, r
        emp = empirical_transition(y, ny, 10)
        off = emp[~np.eye(10, dtype=bool)]
        assert np.abs(off - r / 9).max() < 5 * np.sqrt(r / 9 / 10_000)  # every wrong class alike
        assert close_to(emp, transition_matrix(10, "sym", r), 10_000)
    t = transition_matrix(10, "sym", 0.5)
    assert (
        np.allclose(t.sum(1), 1) and np.allclose(np.diag(t), 0.5) and np.isclose(t[0, 1], 0.5 / 9)
    )


def test_asymmetric_noise_flips_only_the_mapped_pairs():
    names = list(CIFAR10_CLASSES)
    cifar = ASYM_MAPS["cifar10"]
    for src, dst in (
        ("bird", "airplane"),
        ("cat", "dog"),
        ("dog", "cat"),
        ("deer", "horse"),
        ("truck", "automobile"),
    ):
        assert cifar[names.index(src)] == names.index(dst)
    assert {i: j for i, j in enumerate(ASYM_MAPS["mnist"]) if i != j} == {2: 7, 3: 8, 5: 6, 6: 5}
    assert {i: j for i, j in enumerate(ASYM_MAPS["fmnist"]) if i != j} == {0: 6, 2: 4, 5: 7}
    y = np.arange(40_000) % 10
    for kind, amap in ASYM_MAPS.items():
        ny = noisy_labels(y, 10, "asym", 0.4, seed=0, asym_map=amap)
        amap = np.asarray(amap)
        assert np.all((ny == y) | (ny == amap[y])), kind  # nothing but the pairs
        mapped = amap[y] != y
        assert np.all(ny[~mapped] == y[~mapped])  # unmapped classes never change
        assert abs((ny[mapped] != y[mapped]).mean() - 0.4) < 0.015
        emp = empirical_transition(y, ny, 10)
        assert close_to(emp, transition_matrix(10, "asym", 0.4, amap), 4_000)


def test_noise_is_a_function_of_its_arguments_only():
    y = np.arange(1000) % 10
    np.random.seed(1)
    torch.manual_seed(1)
    a = noisy_labels(y, 10, "sym", 0.5, seed=7)
    np.random.seed(2)
    torch.manual_seed(2)
    _ = np.random.rand(5), torch.rand(5)
    assert np.array_equal(a, noisy_labels(y, 10, "sym", 0.5, seed=7))
    assert not np.array_equal(a, noisy_labels(y, 10, "sym", 0.5, seed=8))
    x = np.random.default_rng(0).normal(size=(1000, 6))
    b = noisy_labels(y, 10, "idnx", 0.3, seed=7, features=x)
    assert np.array_equal(b, noisy_labels(y, 10, "idnx", 0.3, seed=7, features=x))
    assert np.array_equal(noisy_labels(y, 10, "none", 0.0, seed=7), y)


def _idnx_reference(y, x, k, r, seed):
    """Upstream's `generate_dict_idnx` one sample at a time, with the same draws in order."""
    rng = np.random.default_rng([seed, 7919])
    w = rng.standard_normal((k, x.shape[1], k))
    q = stats.truncnorm(-r / 0.1, (1 - r) / 0.1, loc=r, scale=0.1).rvs(len(y), random_state=rng)
    u = rng.random(len(y))
    out = []
    for i in range(len(y)):
        p = x[i] @ w[y[i]]
        p[y[i]] = -np.inf
        p = np.exp(p - p.max())
        p = q[i] * p / p.sum()
        p[y[i]] += 1 - q[i]
        out.append(min(int(np.searchsorted(np.cumsum(p), u[i], side="right")), k - 1))
    return np.asarray(out)


def test_idnx_matches_upstreams_loop_and_depends_on_the_input():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, 3000)
    x = rng.normal(size=(3000, 8))
    ny = noisy_labels(y, 5, "idnx", 0.3, seed=11, features=x)
    assert np.array_equal(ny, _idnx_reference(y, x, 5, 0.3, 11))
    big_y = np.arange(30_000) % 10
    big_x = np.random.default_rng(5).random((30_000, 20))
    for r in (0.2, 0.4):
        expected = stats.truncnorm(-r / 0.1, (1 - r) / 0.1, loc=r, scale=0.1).mean()
        rate = (noisy_labels(big_y, 10, "idnx", r, seed=1, features=big_x) != big_y).mean()
        assert abs(rate - expected) < 0.012 and abs(rate - r) < 0.02, (r, rate)
    # Instance-dependent: among flipped class-0 samples, where a label goes depends on x.
    flipped = (ny != y) & (y == 0)
    side = x[:, 0] > 0
    a = np.bincount(ny[flipped & side], minlength=5) / max((flipped & side).sum(), 1)
    b = np.bincount(ny[flipped & ~side], minlength=5) / max((flipped & ~side).sum(), 1)
    assert 0.5 * np.abs(a - b).sum() > 0.2
    with pytest.raises(ConfigValueError, match="instance-dependent"):
        transition_matrix(5, "idnx", 0.3)


def test_bad_noise_settings_fail_in_one_line():
    y = np.zeros(10, dtype=int)
    for call, match in (
        (lambda: noisy_labels(y, 10, "sym", 0.95, 0), "K-1"),
        (lambda: noisy_labels(y, 10, "asym", 0.2, 0), "class map"),
        (lambda: noisy_labels(y, 10, "pair", 0.2, 0), "did you mean|available"),
        (lambda: noisy_labels(y, 10, "idnx", 0.2, 0), "features"),
    ):
        with pytest.raises(ConfigValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Image datasets on miniature trees


def make_mnist_tree(root, n_train=200, n_test=50, folder="mnist/MNIST/raw", gz_test=True):
    rng = np.random.default_rng(0)
    xtr, xte = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (n_train, n_test))
    ytr, yte = np.arange(n_train) % 10, (np.arange(n_test) * 3) % 10
    raw = root / folder
    write_idx(raw / "train-images-idx3-ubyte", xtr)
    write_idx(raw / "train-labels-idx1-ubyte", ytr)
    ext = ".gz" if gz_test else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{ext}", xte)
    write_idx(raw / f"t10k-labels-idx1-ubyte{ext}", yte)
    return xtr, ytr, xte, yte


def test_idx_format_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)
    raw = (tmp_path / "a-idx3-ubyte").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and int.from_bytes(raw[4:8], "big") == 3  # MNIST's header


def test_mnist_module_splits_labels_and_images(tmp_path, caplog):
    xtr, ytr, xte, yte = make_mnist_tree(tmp_path)
    spec = get_spec("mnist_noisy")
    assert spec.counts(tmp_path) == {"train": 200, "test": 50}
    with caplog.at_level(logging.INFO, logger="reprolab.data.noisy"):
        dm = NoisyClassificationDataModule(
            "mnist_noisy", "mnist_noisy", root=str(tmp_path), noise_type="sym", noise_rate=0.5,
            noise_seed=3, val=True, batch_size=16, eval_batch_size=20,
        )  # fmt: skip
        dm.configure(preprocess=PRE28)
        dm.setup("fit")
    noisy = noisy_labels(ytr, 10, "sym", 0.5, seed=3)
    train, val = dm._splits["train"], dm._splits["val"]
    assert len(val) == 20 and len(train) == 180  # upstream: the first 10 % is val
    v = val[3]
    assert (v["label"], v["clean_label"], v["index"]) == (noisy[3], ytr[3], 3)
    assert torch.allclose(
        v["image"], torch.tensor(xtr[3] / 255.0, dtype=torch.float32).expand(3, -1, -1)
    )
    t = train[5]
    assert (t["label"], t["clean_label"], t["index"]) == (noisy[25], ytr[25], 5)
    assert torch.allclose(t["image"][0], torch.tensor(xtr[25] / 255.0, dtype=torch.float32))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "label", "clean_label", "index"} and batch["image"].shape == (
        16,
        3,
        28,
        28,
    )
    test = next(iter(dm.test_dataloader()[0]))
    assert torch.equal(test["label"], torch.as_tensor(yte[:20])) and torch.equal(
        test["label"], test["clean_label"]
    )
    s = dm.noise_summary
    assert s["n_train"] == 180 and s["realised_train"] == pytest.approx(
        (noisy[20:] != ytr[20:]).mean()
    )
    assert s["realised_val"] == pytest.approx((noisy[:20] != ytr[:20]).mean())
    assert "realised P(ỹ≠y)" in caplog.text
    assert dm.noise_rate == 0.5 and np.allclose(dm.transition, transition_matrix(10, "sym", 0.5))
    ordered = next(iter(dm.train_eval_dataloader()))
    assert torch.equal(ordered["index"], torch.arange(20)) and torch.equal(
        ordered["label"], torch.as_tensor(noisy[20:40])
    )
    # val: false trains on the whole pool with the same noisy labels.
    dm_all = NoisyClassificationDataModule(
        "mnist_noisy",
        "mnist_noisy",
        root=str(tmp_path),
        noise_type="sym",
        noise_rate=0.5,
        noise_seed=3,
    )
    dm_all.configure(preprocess=PRE28)
    dm_all.setup("fit")
    assert len(dm_all._splits["train"]) == 200 and "val" not in dm_all._splits
    assert dm_all._splits["train"][25]["label"] == noisy[25] and dm_all.val_dataloader() == []
    assert dm_all.info.classnames == tuple(str(d) for d in range(10))


def test_idnx_on_mnist_reads_upstreams_inputs(tmp_path):
    xtr, ytr, _, _ = make_mnist_tree(tmp_path)
    feats = get_spec("mnist_noisy").noise_features(tmp_path)
    assert feats.shape == (200, 784) and np.allclose(
        feats, xtr.reshape(200, -1) / 255.0
    )  # ToTensor
    dm = NoisyClassificationDataModule(
        "m", "mnist_noisy", root=str(tmp_path), noise_type="idnx", noise_rate=0.4, noise_seed=1
    )
    dm.configure(preprocess=PRE28)
    dm.setup()
    expected = noisy_labels(ytr, 10, "idnx", 0.4, 1, features=xtr.reshape(200, -1) / 255.0)
    assert np.array_equal(dm._splits["train"].noisy, expected) and dm.transition is None


def test_cifar10_batches_and_upstream_normalisation(tmp_path):
    from torchvision import transforms as T

    rng = np.random.default_rng(1)
    raw = tmp_path / "cifar10" / "cifar-10-batches-py"
    xs = [rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
    for i in range(5):
        write_cifar_batch(raw / f"data_batch_{i + 1}", xs[i], (np.arange(20) + i) % 10)
    write_cifar_batch(raw / "test_batch", xs[5], np.arange(20) % 10)
    spec = get_spec("cifar10_noisy")
    split = spec.load(tmp_path, "train")
    assert len(split) == 100 and split.labels[20:23] == [1, 2, 3]
    img = split[21]["image"]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), xs[1][1])
    upstream = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert np.allclose(
        spec.noise_features(tmp_path)[21], upstream(img).numpy().reshape(-1), atol=1e-6
    )
    dm = NoisyClassificationDataModule(
        "c", "cifar10_noisy", root=str(tmp_path), noise_type="asym", noise_rate=0.4, val=True
    )
    dm.configure(preprocess=PRE32)
    dm.setup()
    item = dm._splits["train"][0]
    assert torch.allclose(item["image"], upstream(split[10]["image"]), atol=1e-6)
    assert set(np.unique(dm._splits["train"].noisy[dm._splits["train"].clean == 3])) <= {3, 5}


def test_missing_image_data_names_the_command(tmp_path):
    for name in ("mnist_noisy", "fmnist_noisy", "cifar10_noisy", "clothing1m", "food101n"):
        with pytest.raises(DataNotFoundError, match=f"python scripts/prepare_data.py {name}"):
            get_spec(name).check(tmp_path)
    with pytest.raises(DataNotFoundError, match="authors"):
        get_spec("clothing1m").prepare(tmp_path)  # manual only: prints the steps


def test_fmnist_gz_layout_and_data_module_errors(tmp_path):
    make_mnist_tree(tmp_path, folder="fmnist/FashionMNIST/raw", gz_test=False)
    spec = get_spec("fmnist_noisy")
    assert spec.classnames[0] == "T-shirt/top" and spec.counts(tmp_path)["test"] == 50
    with pytest.raises(ConfigValueError, match="num_shots"):
        NoisyClassificationDataModule("f", "fmnist_noisy", root=str(tmp_path), num_shots=4)
    with pytest.raises(ConfigValueError, match="K-1"):
        NoisyClassificationDataModule(
            "f", "fmnist_noisy", root=str(tmp_path), noise_type="sym", noise_rate=0.95
        )


# ------------------------------------------------------------------------------------------------
# Clothing1M and Food-101N


def _jpg(path, value=100, size=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 50, 200)).save(path)


def make_clothing_tree(root, strip=False):
    d = root / "clothing1m"
    noisy = [(f"images/{i % 10}/{i:02d}/{i}.jpg", (i * 5) % 14) for i in range(60)]
    clean = [(f"images/{i % 10}/{i:02d}/{i}.jpg", i % 14) for i in range(40, 80)]  # 40..59 overlap
    for key, _ in noisy + clean:
        _jpg(d / (key[len("images/") :] if strip else key))
    d.mkdir(parents=True, exist_ok=True)
    (d / "noisy_label_kv.txt").write_text("".join(f"{k} {y}\n" for k, y in noisy))
    (d / "clean_label_kv.txt").write_text("".join(f"{k} {y}\n" for k, y in clean))
    (d / "noisy_train_key_list.txt").write_text("".join(f"{k}\n" for k, _ in noisy[:50]))
    (d / "clean_val_key_list.txt").write_text("".join(f"{k}\n" for k, _ in clean[:20]))
    (d / "clean_test_key_list.txt").write_text("".join(f"{k}\n" for k, _ in clean[20:]))
    return noisy, clean


@pytest.mark.parametrize("strip", [False, True])
def test_clothing1m_protocols(tmp_path, strip):
    noisy, clean = make_clothing_tree(tmp_path, strip)
    up = get_spec("clothing1m")
    train, test = up.load(tmp_path, "train"), up.load(tmp_path, "test")
    assert train.labels == [y for _, y in noisy] and test.labels == [y for _, y in clean]
    assert train[3]["image"].size == (40, 36)  # the key resolves in either image layout
    cl = up.clean_labels(tmp_path, "train")
    assert cl[:40] == [CLEAN_UNKNOWN] * 40 and cl[40:] == [i % 14 for i in range(40, 60)]
    std = get_spec("clothing1m", protocol="standard")
    assert std.counts(tmp_path) == {"train": 50, "val": 20, "test": 20}
    assert std.load(tmp_path, "val").labels == [y for _, y in clean[:20]]
    dm = NoisyClassificationDataModule(
        "clothing1m", "clothing1m", root=str(tmp_path), val=True, noise_seed=2, crop_from=36,
        normalize={"mean": [0.6959, 0.6537, 0.6371], "std": [0.3113, 0.3192, 0.3214]},
        train_augment=True,
    )  # fmt: skip
    dm.configure(preprocess=Preprocess(32, (0.5,) * 3, (0.5,) * 3, "bilinear"))
    dm.setup()
    tr, va = dm._splits["train"], dm._splits["val"]
    assert len(tr) + len(va) == 60 and 0 < len(va) < 20  # a seeded random ~10 %
    assert np.array_equal(np.sort(np.concatenate([tr.indices, va.indices])), np.arange(60))
    assert np.array_equal(va.noisy, np.asarray([y for _, y in noisy])[va.indices])  # noisy val
    assert (
        dm.noise_rate == 0.38
        and dm.transition is None
        and dm.noise_summary["realised_train"] is not None
    )
    x = va[0]["image"]  # Resize(36) + CenterCrop(32), Clothing1M's normalisation
    blue = np.asarray(up.load(tmp_path, "train")[int(va.indices[0])]["image"])[..., 2].mean() / 255
    assert x.shape == (3, 32, 32) and float(x[2].mean()) == pytest.approx(
        (blue - 0.6371) / 0.3214, abs=1e-3
    )
    assert tr[0]["image"].shape == (3, 32, 32)
    std_dm = NoisyClassificationDataModule(
        "c", "clothing1m", root=str(tmp_path), dataset_kwargs={"protocol": "standard"}, val=True
    )
    std_dm.configure(preprocess=PRE32)
    std_dm.setup()
    assert len(std_dm._splits["val"]) == 20 and std_dm._splits["val"][0]["label"] == clean[0][1]


def test_food101n_trains_on_food101n_and_tests_on_food101(tmp_path):
    folders = get_spec("food101n").folders
    n = tmp_path / "Food-101N_release"
    (n / "meta").mkdir(parents=True)
    (n / "meta" / "classes.txt").write_text("class_name\n" + "\n".join(folders) + "\n")
    train = [f"{folders[i % 3]}/k{i}.jpg" for i in range(12)]
    (n / "meta" / "imagelist.tsv").write_text("class_name/key\n" + "\n".join(train) + "\n")
    for rel in train:
        _jpg(n / "images" / rel)
    f = tmp_path / "food-101"
    (f / "meta").mkdir(parents=True)
    test = [f"{folders[100]}/{i}" for i in range(4)]
    (f / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    for rel in test:
        _jpg(f / "images" / f"{rel}.jpg", value=7)
    spec = get_spec("food101n")
    assert spec.counts(tmp_path) == {"train": 12, "test": 4}
    assert spec.load(tmp_path, "train").labels[:4] == [0, 1, 2, 0]
    te = spec.load(tmp_path, "test")
    assert te.labels == [100] * 4 and abs(int(np.asarray(te[0]["image"])[0, 0, 0]) - 7) <= 3  # JPEG
    assert spec.clean_labels(tmp_path, "train") == [CLEAN_UNKNOWN] * 12
    dm = NoisyClassificationDataModule("food101n", "food101n", root=str(tmp_path))
    dm.configure(preprocess=PRE32)
    dm.setup()
    item = dm._splits["train"][1]
    assert item["label"] == 1 and item["clean_label"] == CLEAN_UNKNOWN and dm.noise_rate == 0.27
    assert dm.noise_summary["realised_train"] is None  # no clean label known


# ------------------------------------------------------------------------------------------------
# noisy_blobs


def test_noisy_blobs_splits_noise_and_determinism():
    dm = NoisyBlobsDataModule("noisy_blobs", n_train=300, n_test=600, val=True)
    tr, va, te = (dm.split_tensors(s) for s in ("train", "val", "test"))
    assert (
        tr["image"].shape == (270, 12)
        and va["image"].shape == (30, 12)
        and te["image"].shape == (600, 12)
    )
    assert torch.equal(te["label"], te["clean_label"])
    again = NoisyBlobsDataModule("noisy_blobs", n_train=300, n_test=600, val=False, shuffle_seed=9)
    pool = again.split_tensors("train")
    assert torch.equal(pool["image"][:30], va["image"]) and torch.equal(
        pool["label"][30:], tr["label"]
    )
    rate = (pool["label"] != pool["clean_label"]).float().mean().item()
    assert abs(rate - 0.4) < 0.08 and dm.noise_summary["realised_train"] is not None
    assert torch.bincount(pool["clean_label"]).tolist() == [100, 100, 100]
    means = torch.stack([pool["image"][pool["clean_label"] == c, :2].mean(0) for c in range(3)])
    assert torch.allclose(means.norm(dim=1), torch.full((3,), 6.0), atol=0.4)  # on the circle
    other = NoisyBlobsDataModule("noisy_blobs", n_train=300, noise_seed=1)
    assert torch.equal(other.split_tensors("train")["image"], pool["image"])
    assert not torch.equal(other.split_tensors("train")["label"], pool["label"])
    asym = NoisyBlobsDataModule("b", n_train=300, noise_type="asym", noise_rate=0.3)
    a = asym.split_tensors("train")
    assert torch.all((a["label"] == a["clean_label"]) | (a["label"] == (a["clean_label"] + 1) % 3))
    dm.configure(preprocess=VectorInput(12))
    with pytest.raises(ConfigValueError, match="input_dim=12"):
        dm.configure(preprocess=VectorInput(8))
    dm.setup()
    assert next(iter(dm.val_dataloader()))["label"].shape == (30,)
    assert dm.info.classnames == ("blob 0", "blob 1", "blob 2")
