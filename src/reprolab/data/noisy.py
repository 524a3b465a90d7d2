"""Noisy-label data for NPC and its classifier baselines (robustness_ood_prompting.md §4.4).

NPC (Bae et al., "From Noisy Prediction to True Label: Noisy Prediction Calibration via Generative
Model", ICML 2022, arXiv 2205.00690) and the classifiers it post-processes train on noisy labels ỹ
and are tested on clean labels. Upstream (`BaeHeeSun/NPC` @ 928f4d0, `generate_noisy_data.py`,
`library/util/noise_generator.py`) corrupts the whole training set once, then takes the FIRST 10 %
of it (in dataset order) as the validation split, whose labels are noisy too (`Val_Clean` +
`Val_Noisy`, read with their `label` = ỹ by the early-stopping baseline `library/ES.py`). Test
labels are clean.

Noise (`noisy_labels`; deterministic in (`noise_type`, `rate`, `seed`), never in the run seed):

- `sym` (`generate_dict_sym`): with probability r·K/(K−1) a label is replaced by one drawn uniformly
  from all K classes (possibly itself), so P(ỹ ≠ y) = r and T = (1−r)·I + r/(K−1)·(1 − I);
- `asym` (`generate_dict_asym`): with probability r, y → map[y] (a fixed class map; classes mapped
  to themselves never change), so T[i, map[i]] = r on the mapped classes only. The maps (`label_list`
  upstream): MNIST 2→7, 3→8, 5↔6; FMNIST 0→6, 2→4, 5→7; CIFAR-10 bird→airplane, cat↔dog,
  deer→horse, truck→automobile;
- `idnx` (`generate_dict_idnx`, Xia et al.'s part-dependent instance noise): per sample a flip rate
  q ~ N(r, 0.1²) truncated to [0, 1]; W ~ N(0, 1)^{K×D×K}; p = softmax(x·W[y]) over the classes
  other than y, scaled by q, and 1 − q on y; ỹ ~ p. x is the flattened input as upstream's loader
  served it (MNIST/FMNIST: ToTensor, [0, 1]; CIFAR-10: (x − 0.5)/0.5, C·H·W order);
- `none`: the given labels (the real noisy datasets, Clothing1M and Food-101N).

Batches: train and val items carry `label` = ỹ and `clean_label` = y (`CLEAN_UNKNOWN` = −1 where
the true label is not known: most of Clothing1M, all of Food-101N); test items carry the clean
`label` (and `clean_label`, the same). Every train / val item has `index`, its position in its split.
The data module logs the realised noise rate of each split at setup and keeps it in
`noise_summary`; `noise_rate` (the nominal rate, or the known one of a real noisy dataset) and
`transition` (T for sym/asym, else None) are what Co-teaching's forget rate and Forward with the
true T read.

Two data modules: `NoisyClassificationDataModule` (image datasets; a `ClassificationDataModule`
whose train / val splits are wrapped) and `NoisyBlobsDataModule` (`noisy_blobs`, K Gaussian blobs
as vectors for the miniature: model=mlp_featurizer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from reprolab.data.datamodule import ClassificationDataModule, _Transformed
from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.data.tabular import Rows, RowsDataModule
from reprolab.data.transforms import Preprocess, build_transforms
from reprolab.data.vector_groups import VectorInput
from reprolab.errors import ConfigValueError
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

NOISE_TYPES: tuple[str, ...] = ("none", "sym", "asym", "idnx")
CLEAN_UNKNOWN = -1  # `clean_label` of a sample whose true label is not known (real noisy data)
IDNX_STD = 0.1  # std of the per-sample flip rate (upstream's truncnorm scale)
_NOISE_STREAM = 7919  # the noise RNG is default_rng([seed, this]): apart from data generation
VAL_HOLDOUTS = (None, "first", "random")


# ------------------------------------------------------------------------------------------------
# Noise


def check_noise(
    noise_type: str,
    rate: float,
    num_classes: int,
    asym_map: Sequence[int] | None = None,
    where: str = "data",
) -> None:
    """One-line `ConfigValueError` for a noise setting that cannot be generated."""
    if noise_type not in NOISE_TYPES:
        raise ConfigValueError(f"{where}: " + unknown_name("noise type", noise_type, NOISE_TYPES))
    if noise_type == "none":
        return
    r = float(rate)
    if noise_type == "sym" and not 0.0 <= r <= (num_classes - 1) / num_classes:
        raise ConfigValueError(
            f"{where}: symmetric noise rate {r} must lie in [0, (K-1)/K] = "
            f"[0, {(num_classes - 1) / num_classes:.3g}] (a label is redrawn uniformly with "
            f"probability r·K/(K-1)); set data.noise_rate lower."
        )
    if noise_type in ("asym", "idnx") and not 0.0 <= r <= 1.0:
        raise ConfigValueError(f"{where}: noise rate {r} must lie in [0, 1]; set data.noise_rate.")
    if noise_type == "asym":
        if asym_map is None:
            raise ConfigValueError(
                f"{where}: asymmetric noise needs a class map (map[y] = the label a flipped y "
                "gets); this dataset has none, so pass asym_map or use noise_type=sym."
            )
        m = [int(c) for c in asym_map]
        if len(m) != num_classes or any(not 0 <= c < num_classes for c in m):
            raise ConfigValueError(
                f"{where}: the asymmetric class map {m} must list one class in 0..{num_classes - 1} "
                f"for each of the {num_classes} classes."
            )


def transition_matrix(
    num_classes: int, noise_type: str, rate: float, asym_map: Sequence[int] | None = None
) -> np.ndarray:
    """T[i, j] = P(ỹ = j | y = i) of `sym`, `asym` or `none` noise. (K, K) float64.

    `idnx` noise depends on the input, so it has no class-level T: asking for it is an error.
    """
    k = int(num_classes)
    check_noise(noise_type, rate, k, asym_map, "transition_matrix")
    r = float(rate)
    if noise_type == "none":
        return np.eye(k)
    if noise_type == "sym":
        return (1.0 - r) * np.eye(k) + r / (k - 1) * (1.0 - np.eye(k))
    if noise_type == "asym":
        t = np.eye(k)
        for i, j in enumerate(int(c) for c in asym_map):  # type: ignore[union-attr]
            if j != i:
                t[i, i], t[i, j] = 1.0 - r, r
        return t
    raise ConfigValueError(
        "transition_matrix: idnx noise is instance-dependent and has no class transition matrix; "
        "use method.transition=estimated (Forward) or noise_type=sym/asym."
    )


def noisy_labels(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    noise_type: str,
    rate: float,
    seed: int,
    features: np.ndarray | None = None,
    asym_map: Sequence[int] | None = None,
) -> np.ndarray:
    """Noisy labels ỹ for clean `labels` (module docstring), a function of its arguments only.

    Args:
        labels: clean labels y (N,).
        num_classes: K.
        noise_type: `none`, `sym`, `asym` or `idnx`.
        rate: the noise rate r (sym: P(ỹ ≠ y); asym: P(flip) on mapped classes; idnx: mean flip
            rate before truncation).
        seed: the noise seed (`data.noise_seed`).
        features: (N, D) inputs as upstream's loader served them; `idnx` only.
        asym_map: map[y] = the class a flipped y becomes; `asym` only.

    Returns:
        ỹ (N,) int64.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = int(num_classes)
    check_noise(noise_type, rate, k, asym_map, "noisy_labels")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"noisy_labels: labels must lie in 0..{k - 1}, got {y.min()}..{y.max()}.")
    if noise_type == "none":
        return y.copy()
    rng = np.random.default_rng([int(seed), _NOISE_STREAM])
    r = float(rate)
    n = len(y)
    if noise_type == "sym":
        redraw = rng.random(n) < r * k / (k - 1)  # generate_dict_sym: Noise_ratio *= 10/9
        drawn = rng.integers(0, k, n)
        return np.where(redraw, drawn, y)
    if noise_type == "asym":
        flip = rng.random(n) < r
        return np.where(flip, np.asarray([int(c) for c in asym_map], np.int64)[y], y)  # type: ignore[union-attr]
    if features is None:
        raise ConfigValueError(
            "noisy_labels: idnx noise is a function of the inputs; pass features (N, D) (the data "
            "module reads them from its dataset spec)."
        )
    x = np.asarray(features, dtype=np.float64).reshape(n, -1)
    from scipy import stats

    w = rng.standard_normal(
        (k, x.shape[1], k)
    )  # W = torch.randn(label_num, feature_size, label_num)
    lo, hi = (0.0 - r) / IDNX_STD, (1.0 - r) / IDNX_STD
    q = stats.truncnorm(lo, hi, loc=r, scale=IDNX_STD).rvs(n, random_state=rng)
    logits = np.empty((n, k))
    for c in range(k):
        rows = y == c
        logits[rows] = x[rows] @ w[c]
    logits[np.arange(n), y] = -np.inf  # p[labels] = -inf: the flip goes to another class
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p *= q[:, None]
    p[np.arange(n), y] += 1.0 - q
    u = rng.random(n)
    return np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), k - 1).astype(np.int64)


def realised_rate(noisy: np.ndarray, clean: np.ndarray) -> float | None:
    """Fraction of samples with ỹ ≠ y among those whose clean label is known (None: none known)."""
    known = np.asarray(clean) != CLEAN_UNKNOWN
    if not known.any():
        return None
    return float((np.asarray(noisy)[known] != np.asarray(clean)[known]).mean())


def holdout_indices(n: int, how: str | None, fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation items carved from a training pool of `n` (sorted).

    `first`: the first ceil(fraction·n) items (upstream `i < len(loader)*0.1` over the dataset
    order, MNIST/FMNIST/CIFAR-10); `random`: each item with probability `fraction`, seeded (upstream
    `random.random() > 0.9` per line, unseeded, Clothing1M / Food-101).
    """
    if how == "first":
        return np.arange(int(np.ceil(fraction * n)))
    if how == "random":
        rng = np.random.default_rng([int(seed), _NOISE_STREAM, 1])
        return np.flatnonzero(rng.random(n) < fraction)
    raise ConfigValueError(unknown_name("validation holdout", str(how), VAL_HOLDOUTS[1:]))


class _Labels:
    """What the base data module's samplers read from a split (`labels`, `groups`)."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = [int(v) for v in labels]
        self.groups = None


class NoisySplit(Dataset):
    """Items `indices` of `base` with `label` = ỹ, `clean_label` = y and `index` = position here."""

    def __init__(
        self, base: Dataset, indices: np.ndarray, noisy: np.ndarray, clean: np.ndarray
    ) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.noisy = np.asarray(noisy, dtype=np.int64)
        self.clean = np.asarray(clean, dtype=np.int64)
        self.split = _Labels(self.noisy)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[int(self.indices[i])])
        item["label"] = int(self.noisy[i])
        item["clean_label"] = int(self.clean[i])
        item["index"] = i
        return item


class CleanTestSplit(Dataset):
    """A test split with `clean_label` (= its clean `label`) added to every item."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.split = getattr(base, "split", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        item["clean_label"] = item["label"]
        return item


def _summary(name: str, noise: dict[str, Any], parts: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Realised rate per split (logged) and the record kept as `noise_summary`."""
    out = dict(noise)
    for split, (noisy, clean) in parts.items():
        rate = realised_rate(noisy, clean)
        out[f"realised_{split}"] = rate
        out[f"n_{split}"] = len(noisy)
    shown = ", ".join(
        f"{s} {out[f'realised_{s}'] * 100:.2f}% of {out[f'n_{s}']}"
        if out[f"realised_{s}"] is not None
        else f"{s} unknown (no clean labels) of {out[f'n_{s}']}"
        for s in parts
    )
    log.info(
        "%s: label noise %s at nominal rate %s (seed %s); realised P(ỹ≠y): %s",
        name,
        noise["noise_type"],
        noise["noise_rate"],
        noise["noise_seed"],
        shown,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Image datasets


class NoisyClassificationDataModule(ClassificationDataModule):
    """A `ClassificationDataModule` over a noisy-label dataset spec (`reprolab.data.datasets.noisy`).

    The spec's train split (clean labels for MNIST / FMNIST / CIFAR-10, the given noisy labels for
    Clothing1M / Food-101N) is corrupted by `noise_type` as a whole; with `val: true` the validation
    split is carved from it as upstream (the spec's `val_holdout`: the first 10 % or a seeded random
    10 %; a spec with its own val split, Clothing1M's standard protocol, serves that one), and the
    train split is the rest. With `val: false` (upstream's `train_test()`, every baseline except
    early stopping) the train split is the whole pool. Test sets are the spec's, with clean labels.

    Args:
        name: data config name.
        dataset: registered spec (`mnist_noisy`, `fmnist_noisy`, `cifar10_noisy`, `clothing1m`,
            `food101n`).
        root: data root (`paths.data_dir`).
        dataset_kwargs: the spec's own arguments (Clothing1M's `protocol`).
        noise_type: `none`, `sym`, `asym` or `idnx` (module docstring).
        noise_rate: nominal rate r.
        noise_seed: seed of the noise and of a random holdout (fixed: one noisy dataset for all
            runs, like upstream's released pickles; `${seed}` varies it with the run).
        val: serve a validation split with noisy labels (early stopping).
        val_fraction: share of the training pool held out for validation (upstream 0.1).
        shuffle_seed: seed of the per-epoch training order (`${seed}`).
        crop_from: resize the shorter side to this, then crop to the model's input size (random
            crop + horizontal flip in training when `train_augment`, centre crop otherwise):
            upstream's Resize(256) + RandomCrop/CenterCrop(224) for Clothing1M and Food-101N. None:
            the framework's transforms (`reprolab.data.transforms.build_transforms`).
        normalize: `{mean: [..], std: [..]}` replacing the model's normalisation (Clothing1M's own
            statistics upstream); None: the model's.
        **kwargs: `ClassificationDataModule`'s (`train_augment`, `batch_size`, `eval_batch_size`,
            `num_workers`, `drop_last`, `sampler`, `cache_images`, `test_sets`).
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        root: str | None = None,
        dataset_kwargs: dict | None = None,
        noise_type: str = "none",
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        val: bool = False,
        val_fraction: float = 0.1,
        shuffle_seed: int = 1,
        crop_from: int | None = None,
        normalize: dict[str, Sequence[float]] | None = None,
        train_augment: bool | str = False,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        for key in ("num_shots", "fewshot_seed", "subsample_classes"):
            if kwargs.get(key) is not None:
                raise ConfigValueError(
                    f"data={name}: {key} does not apply to noisy-label data (the whole training "
                    f"set trains); remove data.{key}."
                )
            kwargs.pop(key, None)
        super().__init__(
            name,
            dataset,
            root=root,
            dataset_kwargs=dataset_kwargs,
            num_shots=None,
            fewshot_seed=int(shuffle_seed),
            train_augment=train_augment,
            val=val,
            drop_last=drop_last,
            **kwargs,
        )
        k = len(self.spec.classnames)
        self.asym_map = getattr(self.spec, "asym_map", None)
        check_noise(noise_type, noise_rate, k, self.asym_map, f"data={name}")
        if noise_type == "idnx" and not callable(getattr(self.spec, "noise_features", None)):
            raise ConfigValueError(
                f"data={name}: idnx noise needs the inputs of {dataset} as vectors, which this "
                "spec does not provide; use noise_type=sym or asym."
            )
        if not 0.0 < float(val_fraction) < 1.0:
            raise ConfigValueError(
                f"data={name}: val_fraction must lie in (0, 1), got {val_fraction}."
            )
        if crop_from is not None and self.cache_images:
            raise ConfigValueError(
                f"data={name}: crop_from sets its own transforms, which cache_images does not "
                "see; set data.cache_images=false."
            )
        if normalize is not None and not {"mean", "std"} <= set(normalize):
            raise ConfigValueError(f"data={name}: normalize needs mean and std, got {normalize}.")
        self.noise_type = noise_type
        self.nominal_rate = float(noise_rate)
        self.noise_seed = int(noise_seed)
        self.val_fraction = float(val_fraction)
        self.crop_from = None if crop_from is None else int(crop_from)
        self.normalize = (
            None
            if normalize is None
            else {
                "mean": tuple(float(v) for v in normalize["mean"]),
                "std": tuple(float(v) for v in normalize["std"]),
            }
        )
        self.noise_summary: dict[str, Any] = {}
        self._eval_base: Dataset | None = None

    # -- what methods read ----------------------------------------------------------------------
    @property
    def noise_rate(self) -> float:
        """The nominal noise rate (Co-teaching's forget rate): `noise_rate`, or for data with
        its own noisy labels (`noise_type: none`) the spec's known rate (Clothing1M 0.38)."""
        if self.noise_type == "none":
            known = getattr(self.spec, "noise_rate", None)
            return float(known) if known is not None else 0.0
        return self.nominal_rate

    @property
    def transition(self) -> np.ndarray | None:
        """T[i, j] = P(ỹ = j | y = i) of the generated noise (sym / asym; `none` on clean data);
        None when unknown (idnx, or the real noisy datasets)."""
        if self.noise_type == "idnx":
            return None
        if self.noise_type == "none":
            return None if getattr(self.spec, "noise_rate", None) else np.eye(len(self.classnames))
        return transition_matrix(
            len(self.classnames), self.noise_type, self.nominal_rate, self.asym_map
        )

    @property
    def val_holdout(self) -> str | None:
        return getattr(self.spec, "val_holdout", "first")

    # -- transforms -----------------------------------------------------------------------------
    def set_preprocess(self, preprocess: Preprocess) -> None:
        if self.normalize is not None:
            preprocess = replace(preprocess, mean=self.normalize["mean"], std=self.normalize["std"])
        super().set_preprocess(preprocess)

    def set_features(self, source: Any) -> None:
        if self.crop_from is not None:
            raise ConfigValueError(
                f"data={self.name}: crop_from sets transforms the feature cache's key does not "
                "record; set data.crop_from=null to serve cached features."
            )
        super().set_features(source)

    def eval_transform(self) -> T.Compose:
        """The deterministic transform of val / test items (and of `train_eval_dataloader`)."""
        return self._transform(train=False)

    def _transform(self, train: bool) -> T.Compose:
        pre = self.preprocess
        if self.crop_from is None:
            return build_transforms(pre, train, self.train_augment if train else False)
        interp = T.InterpolationMode(pre.interpolation)
        resize = T.Resize(self.crop_from, interpolation=interp)
        if train and self.train_augment:
            geo = [resize, T.RandomCrop(pre.image_size), T.RandomHorizontalFlip()]
        else:
            geo = [resize, T.CenterCrop(pre.image_size)]
        return T.Compose([*geo, T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def _serve_features(self) -> None:
        # Runs inside the base `setup` before any feature is encoded: the crop_from transforms.
        if self.crop_from is not None:
            for split, ds in self._splits.items():
                if isinstance(ds, _Transformed):
                    ds.transform = self._transform(train=split == "train")
        super()._serve_features()

    # -- splits ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        holdout = self.val_holdout if self.use_val else None
        own_val = self.use_val and holdout is None  # the spec has a val split of its own
        want_val = self.use_val
        self.use_val = own_val
        try:
            super().setup(stage)
        finally:
            self.use_val = want_val
        pool = self._splits["train"]
        clean_pool = self._clean_labels("train", len(pool))
        given = np.asarray(pool.split.labels, dtype=np.int64)  # clean (synthetic) or noisy (real)
        noisy_pool = self._corrupt(given, "train")
        eval_pool = pool
        if isinstance(pool, _Transformed):  # images: val and `train_eval_dataloader` unaugmented
            eval_pool = _Transformed(pool.split, self.eval_transform())
        self._eval_base = eval_pool
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if holdout is not None:
            val_idx = holdout_indices(len(pool), holdout, self.val_fraction, self.noise_seed)
            train_idx = np.setdiff1d(np.arange(len(pool)), val_idx)
            self._splits["val"] = NoisySplit(
                eval_pool, val_idx, noisy_pool[val_idx], clean_pool[val_idx]
            )
            parts["val"] = (noisy_pool[val_idx], clean_pool[val_idx])
        else:
            train_idx = np.arange(len(pool))
            if own_val:
                val = self._splits["val"]
                clean_val = self._clean_labels("val", len(val))
                noisy_val = self._corrupt(np.asarray(val.split.labels, np.int64), "val")
                self._splits["val"] = NoisySplit(val, np.arange(len(val)), noisy_val, clean_val)
                parts["val"] = (noisy_val, clean_val)
        self._splits["train"] = NoisySplit(
            pool, train_idx, noisy_pool[train_idx], clean_pool[train_idx]
        )
        parts = {"train": (noisy_pool[train_idx], clean_pool[train_idx]), **parts}
        self._train_idx = train_idx
        for key in [k for k in self._splits if k.startswith("test:")]:
            self._splits[key] = CleanTestSplit(self._splits[key])
        noise = {
            "noise_type": self.noise_type,
            "noise_rate": self.noise_rate,
            "noise_seed": self.noise_seed,
        }
        self.noise_summary = _summary(self.name, noise, parts)

    def _clean_labels(self, split: str, n: int) -> np.ndarray:
        """True labels of a split: the spec's `clean_labels` (real noisy data), else its labels."""
        own = getattr(self.spec, "clean_labels", None)
        if callable(own):
            out = np.asarray(own(self.root, split), dtype=np.int64)
        else:
            out = np.asarray(self.spec.load(self.root, split).labels, dtype=np.int64)
        if len(out) != n:
            raise RuntimeError(f"data={self.name}: {len(out)} clean labels for {n} {split} items.")
        return out

    def _corrupt(self, labels: np.ndarray, split: str) -> np.ndarray:
        features = None
        if self.noise_type == "idnx":
            features = self.spec.noise_features(self.root, split)
        return noisy_labels(
            labels,
            len(self.spec.classnames),
            self.noise_type,
            self.nominal_rate,
            self.noise_seed + (0 if split == "train" else 1),
            features=features,
            asym_map=self.asym_map,
        )

    def train_eval_dataloader(self) -> DataLoader:
        """The train split in index order with the deterministic eval transform (no shuffling, no
        augmentation): what a post-processor reads the classifier's training predictions from."""
        self.setup()
        train = self._splits["train"]
        ds = NoisySplit(self._eval_base, train.indices, train.noisy, train.clean)
        return self._loader(ds, False)


# ------------------------------------------------------------------------------------------------
# The synthetic vector task


def blob_means(num_classes: int, dim: int, separation: float) -> np.ndarray:
    """Class means on a circle of radius `separation` in the first two coordinates. (K, D)"""
    if dim < 2:
        raise ConfigValueError(f"noisy_blobs: dim must be >= 2, got {dim}.")
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    means = np.zeros((num_classes, dim))
    means[:, 0], means[:, 1] = np.cos(angles), np.sin(angles)
    return separation * means


def make_blobs(
    n: int, num_classes: int, dim: int, separation: float, std: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`n` points, classes as balanced as n allows, in random order: x = μ_y + std·ε. ((n, D), (n,))"""
    y = np.arange(n) % num_classes
    y = y[rng.permutation(n)]
    x = blob_means(num_classes, dim, separation)[y] + std * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int64)


class NoisyBlobsDataModule(RowsDataModule):
    """`noisy_blobs`: K isotropic Gaussian blobs in D dimensions, vectors not images (§4.5's tiny
    synthetic test; use `model=mlp_featurizer model.input_dim=<dim>`).

    A training pool of `n_train` rows (class means on a circle of radius `separation` in the first
    two coordinates, unit-variance noise in every coordinate times `std`) is corrupted as a whole
    (`noisy_labels`; `asym` flips class c to c + 1 mod K), the first `val_fraction` of it is the
    val split when `val` (upstream's holdout), and the test split (`n_test` rows) keeps clean
    labels. Everything is a function of `data_seed` (points) and `noise_seed` (noise); the run seed
    changes the model and the batch order only. Batches: `image` (B, D) float, `label` (ỹ on train
    and val, y on test), `clean_label`, `index`.

    Args:
        name: data config name.
        num_classes: K.
        dim: D.
        n_train: rows of the training pool (train + val).
        n_test: rows of the test split.
        separation: radius of the circle of class means.
        std: noise scale of every coordinate.
        noise_type, noise_rate, noise_seed: the label noise (module docstring).
        data_seed: seed of the points.
        val: hold out the first `val_fraction` of the pool as a noisy val split.
        val_fraction: its share.
        batch_size, eval_batch_size, shuffle_seed, num_workers, drop_last: as the other row data.
    """

    accepts = ("preprocess",)

    def __init__(
        self,
        name: str,
        num_classes: int = 3,
        dim: int = 12,
        n_train: int = 300,
        n_test: int = 3000,
        separation: float = 6.0,
        std: float = 1.0,
        noise_type: str = "sym",
        noise_rate: float = 0.4,
        noise_seed: int = 0,
        data_seed: int = 0,
        val: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 1,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        k, d = int(num_classes), int(dim)
        if k < 2:
            raise ConfigValueError(f"data={name}: num_classes must be >= 2, got {num_classes}.")
        if int(n_train) < 2 or int(n_test) < 1:
            raise ConfigValueError(f"data={name}: n_train >= 2 and n_test >= 1 are needed.")
        self.asym_map = [(c + 1) % k for c in range(k)]
        check_noise(noise_type, noise_rate, k, self.asym_map, f"data={name}")
        self.name = name
        self.num_classes, self.dim = k, d
        self.noise_type, self.nominal_rate, self.noise_seed = (
            noise_type,
            float(noise_rate),
            int(noise_seed),
        )
        self.use_val = bool(val)
        self.val_fraction = float(val_fraction)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.shuffle_seed, self.num_workers = int(shuffle_seed), int(num_workers)
        self.drop_last = bool(drop_last)
        self.test_sets = ["test"]
        self.preprocess: VectorInput | None = None
        x_pool, y_pool = make_blobs(
            int(n_train), k, d, separation, std, np.random.default_rng([int(data_seed), 0])
        )
        x_test, y_test = make_blobs(
            int(n_test), k, d, separation, std, np.random.default_rng([int(data_seed), 1])
        )
        features = x_pool if noise_type == "idnx" else None
        noisy = noisy_labels(
            y_pool, k, noise_type, noise_rate, noise_seed, features, asym_map=self.asym_map
        )
        val_idx = holdout_indices(len(y_pool), "first", self.val_fraction, self.noise_seed)
        train_idx = (
            np.setdiff1d(np.arange(len(y_pool)), val_idx)
            if self.use_val
            else np.arange(len(y_pool))
        )
        self._tensors = {"train": self._rows(x_pool, noisy, y_pool, train_idx)}
        parts = {"train": (noisy[train_idx], y_pool[train_idx])}
        if self.use_val:
            self._tensors["val"] = self._rows(x_pool, noisy, y_pool, val_idx)
            parts["val"] = (noisy[val_idx], y_pool[val_idx])
        self._tensors["test"] = self._rows(x_test, y_test, y_test, np.arange(len(y_test)))
        noise = {
            "noise_type": noise_type,
            "noise_rate": self.nominal_rate,
            "noise_seed": noise_seed,
        }
        self.noise_summary = _summary(name, noise, parts)
        self._splits: dict[str, Rows] = {}

    @staticmethod
    def _rows(x: np.ndarray, noisy: np.ndarray, clean: np.ndarray, idx: np.ndarray) -> dict:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x[idx])),
            "label": torch.from_numpy(np.asarray(noisy)[idx].astype(np.int64)),
            "clean_label": torch.from_numpy(np.asarray(clean)[idx].astype(np.int64)),
            "index": torch.arange(len(idx)),
        }

    @property
    def classnames(self) -> list[str]:
        return [f"blob {c}" for c in range(self.num_classes)]

    @property
    def info(self) -> ImageClassificationInfo:
        return ImageClassificationInfo(
            name=self.name,
            classnames=tuple(self.classnames),
            templates=("a point of {}.",),
            test_sets=(TestSet("test", "id"),),
        )

    @property
    def noise_rate(self) -> float:
        return self.nominal_rate if self.noise_type != "none" else 0.0

    @property
    def transition(self) -> np.ndarray | None:
        if self.noise_type == "idnx":
            return None
        return transition_matrix(
            self.num_classes, self.noise_type, self.nominal_rate, self.asym_map
        )

    def set_preprocess(self, preprocess: Any) -> None:
        if not isinstance(preprocess, VectorInput) or preprocess.dim != self.dim:
            raise ConfigValueError(
                f"data={self.name} serves {self.dim}-d vectors, but the model asks for "
                f"{preprocess}; use model=mlp_featurizer model.input_dim={self.dim}."
            )
        self.preprocess = preprocess

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = {k: Rows(v) for k, v in self._tensors.items()}

    def split_tensors(self, split: str) -> dict[str, Tensor]:
        """The tensors of a split (`train`, `val`, `test`)."""
        return self._tensors[split]

    def train_eval_dataloader(self) -> DataLoader:
        """The train split in index order (no shuffling)."""
        self.setup()
        return self._loader("train", False)
