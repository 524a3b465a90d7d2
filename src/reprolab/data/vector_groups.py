"""Vector-input group data: the synthetic Waterbirds-like tasks of the SCER and ASGDRO specs.

Spec robustness_ood_prompting.md §1.8 (SCER's synthetic check) and §2.5 (its two-core variant for
ASGDRO / SIL, "an invariant feature absent at test"). Each row is a feature vector, not an image, so
a small MLP featurizer (`model=mlp_featurizer`, `reprolab.models.mlp`) stands in for the backbone;
the task is otherwise an image-classification task of the framework: the data module publishes an
`ImageClassificationInfo` with 4 groups, and batches are

- `image`: float features (B, D) (the key every classification method reads its inputs from);
- `label`: y (B,) long; `group`: g = 2·y + a (B,) long, so G0 = (y0, a0) ... G3 = (y1, a1), as
  Waterbirds and SCER's group index y·|A| + a; `index`: row index within its split (B,).

Generative model of one split with spurious correlation p = P(a = y) (`group_synth`):

    y ~ balanced (exact counts: ⌊n/2⌋ rows of y = 0), s_y = 2y − 1
    a = y for round(p · n_y) rows of each class, a = 1 − y for the rest, s_a = 2a − 1
    z_c = s_y · μ_c · e1 + ε_c,        ε_c ~ N(0, I_2)      core feature, 2-D
    z_s = c_s · s_a + σ_s · ε_s,       ε_s ~ N(0, 1)        spurious feature, 1-D (c_s 1, σ_s 0)
    z_n ~ N(0, σ_n² I_k)                                    k noise dimensions
    x = [z_c, z_s, z_n]   (D = 2 + 1 + k; 16 by default)

Train has p = 0.95 (each minority group (y0, a1), (y1, a0) holds 2.5 % of the rows); val and test
have p = 0.5 (balanced groups). Sizes default to Waterbirds' 4795 / 1199 / 5794.

# DEVIATION: the spec says "y = sign(z_c)". Here y = sign(z_c1) is the Bayes rule of the core
# feature (the class means ±μ_c·e1), not a deterministic function of it: with a deterministic label
# the core would separate the classes perfectly, the Bayes classifier of the training distribution
# would ignore the spurious feature, and ERM would not be hurt. With a noisy core (μ_c = 1.5, core
# Bayes accuracy Φ(1.5) = 93 %) the training Bayes classifier is the log-odds
# 2μ_c·z_c1 + log(p/(1−p))·s_a: it leans on a (the Waterbirds failure), while a group-balanced one uses z_c alone. Measured once
# (plain torch loop, the 16-64-16 MLP and a linear head, Adam 1e-3, batch 108, 1500 steps, 2 seeds):
# test worst-group accuracy ERM ~70 %, GroupDRO (eta 0.01) ~81 %.

`group_synth_two_core` (§2.5): two redundant core features, `core0` with μ = 3.0 (easy, nearly
separable) and `core1` with μ = 1.5, then z_s and k = 11 noise dimensions (D = 16). With
`mask_core_at_test` a second test set `test_masked` (role `shift`) holds the same rows as `test`
with core feature `masked_core` (the easy one by default) zeroed, its class-agnostic mean: a model
that also learned the other core feature keeps its worst-group accuracy there. (Same loop as above:
unmasked WGA ~99 % for both; masked ERM ~47-62 %, GroupDRO ~72-80 %, core1's Bayes limit 93 %.)

Every split is a function of (`data_seed`, its own size and parameters) only:
`numpy.random.default_rng([data_seed, k])`, k = 0, 1, 2 for train, val, test. The run seed changes
the model initialisation and the batch order (`shuffle_seed`), not the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprolab.data.datamodule import check_sampler
from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.data.tabular import Rows, RowsDataModule
from reprolab.errors import ConfigValueError
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

NUM_GROUPS = 4  # (y, a) in {0, 1}^2, g = 2y + a
CORE_DIM = 2
CLASSNAMES = ("negative", "positive")
# Fine-tuning methods require templates from their data; there is no text tower to read them.
TEMPLATES = ("a {} example.",)


@dataclass(frozen=True)
class VectorInput:
    """What a vector-input model expects from its data: rows of `dim` floats, used as they are.

    The counterpart of `reprolab.data.transforms.Preprocess` for feature vectors; a model publishes
    it as `preprocess` and a vector data module checks it (`configure(preprocess=...)`).
    """

    dim: int


@dataclass
class VectorGroupData:
    """One vector group dataset: tensors per split and what the task info needs."""

    splits: dict[str, dict[str, Tensor]]  # split -> {"image": (N, D), "label", "group", "index"}
    roles: dict[str, str]  # test split -> role (`id`, `shift`), in evaluation order
    feature_slices: dict[str, slice]  # block name -> columns of `image`
    classnames: tuple[str, ...] = CLASSNAMES
    templates: tuple[str, ...] = TEMPLATES
    num_groups: int = NUM_GROUPS
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.splits["train"]["image"].shape[1])


def group_counts(n: int, spurious_corr: float) -> list[int]:
    """Exact rows per group G0..G3 of a split of `n` rows with P(a = y) = `spurious_corr`."""
    if not 0.0 <= spurious_corr <= 1.0:
        raise ConfigValueError(f"spurious correlation must be in [0, 1], got {spurious_corr}.")
    n0 = n // 2
    out = []
    for y, n_y in ((0, n0), (1, n - n0)):
        major = int(round(spurious_corr * n_y))
        out += [major, n_y - major] if y == 0 else [n_y - major, major]  # a = y is the majority
    return out


def synth_group_split(
    n: int,
    spurious_corr: float,
    rng: np.random.Generator,
    core_shifts: Sequence[float] = (1.5,),
    spurious_scale: float = 1.0,
    spurious_std: float = 0.0,
    noise_dims: int = 13,
    noise_std: float = 1.0,
) -> dict[str, np.ndarray]:
    """One split of the generative model in the module docstring.

    Returns:
        `x` (n, D) float32 laid out [core_1 .. core_K (2 each), spurious (1), noise (noise_dims)],
        `y`, `a`, `g` (n,) int64, rows in random order.
    """
    counts = group_counts(n, spurious_corr)
    g = np.repeat(np.arange(NUM_GROUPS), counts)[rng.permutation(n)]
    y, a = g // 2, g % 2
    s_y, s_a = (2 * y - 1).astype(np.float64), (2 * a - 1).astype(np.float64)
    cores = []
    for mu in core_shifts:
        z = rng.standard_normal((n, CORE_DIM))
        z[:, 0] += s_y * float(mu)
        cores.append(z)
    z_s = spurious_scale * s_a + spurious_std * rng.standard_normal(n)
    z_n = noise_std * rng.standard_normal((n, int(noise_dims)))
    x = np.concatenate([*cores, z_s[:, None], z_n], axis=1).astype(np.float32)
    return {"x": x, "y": y.astype(np.int64), "a": a.astype(np.int64), "g": g.astype(np.int64)}


def feature_slices(num_cores: int, noise_dims: int) -> dict[str, slice]:
    """Where each block of the generative model sits in `image`."""
    out = {f"core{k}": slice(CORE_DIM * k, CORE_DIM * (k + 1)) for k in range(num_cores)}
    s = CORE_DIM * num_cores
    out["spurious"] = slice(s, s + 1)
    out["noise"] = slice(s + 1, s + 1 + int(noise_dims))
    return out


def _tensors(split: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {
        "image": torch.from_numpy(split["x"]),
        "label": torch.from_numpy(split["y"]),
        "group": torch.from_numpy(split["g"]),
        "index": torch.arange(len(split["y"])),
    }


def load_group_synth(
    n_train: int = 4795,
    n_val: int = 1199,
    n_test: int = 5794,
    train_corr: float = 0.95,
    eval_corr: float = 0.5,
    core_shifts: Sequence[float] = (1.5,),
    spurious_scale: float = 1.0,
    spurious_std: float = 0.0,
    noise_dims: int = 13,
    noise_std: float = 1.0,
    mask_core_at_test: bool = False,
    masked_core: int = 0,
    data_seed: int = 0,
) -> VectorGroupData:
    """The synthetic Waterbirds-like splits (module docstring); `core_shifts` has one μ per core."""
    core_shifts = [float(m) for m in core_shifts]
    if not core_shifts:
        raise ConfigValueError("core_shifts must list at least one core feature's class shift.")
    if mask_core_at_test and not 0 <= masked_core < len(core_shifts):
        raise ConfigValueError(
            f"masked_core={masked_core} is not one of the {len(core_shifts)} core features "
            f"(0..{len(core_shifts) - 1})."
        )
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(n) < 1:
            raise ConfigValueError(f"{key} must be >= 1, got {n}.")
    kw = dict(
        core_shifts=core_shifts,
        spurious_scale=spurious_scale,
        spurious_std=spurious_std,
        noise_dims=noise_dims,
        noise_std=noise_std,
    )
    plan = (("train", n_train, train_corr), ("val", n_val, eval_corr), ("test", n_test, eval_corr))
    splits = {
        name: _tensors(
            synth_group_split(int(n), p, np.random.default_rng([int(data_seed), k]), **kw)
        )
        for k, (name, n, p) in enumerate(plan)
    }
    slices = feature_slices(len(core_shifts), noise_dims)
    roles = {"test": "id"}
    if mask_core_at_test:
        masked = dict(splits["test"])
        masked["image"] = masked["image"].clone()
        masked["image"][:, slices[f"core{masked_core}"]] = 0.0
        splits["test_masked"] = masked
        roles["test_masked"] = "shift"
    params = {"train_corr": train_corr, "eval_corr": eval_corr, "data_seed": data_seed, **kw}
    return VectorGroupData(splits=splits, roles=roles, feature_slices=slices, params=params)


def load_group_synth_two_core(
    core_shifts: Sequence[float] = (3.0, 1.5),
    noise_dims: int = 11,
    mask_core_at_test: bool = True,
    masked_core: int = 0,
    **kwargs: Any,
) -> VectorGroupData:
    """§2.5: two redundant core features (core0 easy), one spurious; `test_masked` zeroes core0."""
    return load_group_synth(
        core_shifts=core_shifts,
        noise_dims=noise_dims,
        mask_core_at_test=mask_core_at_test,
        masked_core=masked_core,
        **kwargs,
    )


VECTOR_DATASETS: dict[str, Callable[..., VectorGroupData]] = {
    "group_synth": load_group_synth,
    "group_synth_two_core": load_group_synth_two_core,
}


def load_vector_dataset(dataset: str, **kwargs: Any) -> VectorGroupData:
    """The vector group dataset `dataset` (`group_synth`, `group_synth_two_core`)."""
    if dataset not in VECTOR_DATASETS:
        raise ConfigValueError(unknown_name("vector dataset", dataset, VECTOR_DATASETS))
    return VECTOR_DATASETS[dataset](**kwargs)


class VectorGroupDataModule(RowsDataModule):
    """Train / val / test splits of a vector group dataset, held in memory; publishes an
    `ImageClassificationInfo` (class names, templates, test sets, `num_groups`).

    The method's `preprocess` requirement must be a `VectorInput` of the data's feature size (a
    vector-input model such as `model=mlp_featurizer`); an image model fails at build time, in one
    line.

    Args:
        name: data config name.
        dataset: `group_synth` or `group_synth_two_core` (`VECTOR_DATASETS`).
        dataset_kwargs: the dataset's own arguments (sizes, correlations, `data_seed`, ...).
        batch_size: training batch size (the last incomplete batch is dropped with `drop_last`).
        eval_batch_size: val / test batch size.
        shuffle_seed: seed of the per-epoch training order (`${seed}`).
        sampler: the training order, as `ClassificationDataModule`'s: null (a permutation per
            epoch), `group_balanced` (rows drawn with replacement, weight 1 / size of their group:
            every group equally likely) or `class_balanced` (the same with classes).
        val: serve the validation split (`val/*` metrics, model selection).
        test_sets: test splits to evaluate, the first being the primary one (default: all).
        num_workers: DataLoader workers (0: the tensors are in memory).
        drop_last: drop the last incomplete training batch.
    """

    accepts = ("preprocess",)

    def __init__(
        self,
        name: str,
        dataset: str,
        dataset_kwargs: dict[str, Any] | None = None,
        batch_size: int = 108,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 1,
        sampler: str | None = None,
        val: bool = True,
        test_sets: Sequence[str] | None = None,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_sampler(name, sampler)
        self.name = name
        self.dataset = dataset
        self.data = load_vector_dataset(dataset, **dict(dataset_kwargs or {}))
        self.test_sets = list(test_sets or self.data.roles)
        for t in self.test_sets:
            if t not in self.data.roles:
                raise ConfigValueError(
                    f"data={name}: " + unknown_name("test set", t, self.data.roles)
                )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle_seed = int(shuffle_seed)
        self.sampler = sampler
        self.use_val = bool(val)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.preprocess: VectorInput | None = None
        self._splits: dict[str, Rows] = {}

    @property
    def feature_dim(self) -> int:
        return self.data.feature_dim

    @property
    def info(self) -> ImageClassificationInfo:
        roles = self.data.roles
        return ImageClassificationInfo(
            name=self.name,
            classnames=tuple(self.data.classnames),
            templates=tuple(self.data.templates),
            test_sets=tuple(TestSet(t, roles[t]) for t in self.test_sets),  # type: ignore[arg-type]
            num_groups=self.data.num_groups,
        )

    def set_preprocess(self, preprocess: Any) -> None:
        if not isinstance(preprocess, VectorInput):
            raise ConfigValueError(
                f"data={self.name} serves {self.feature_dim}-d feature vectors, but the model asks "
                f"for {type(preprocess).__name__} inputs ({preprocess}); use a vector-input model "
                f"(model=mlp_featurizer model.input_dim={self.feature_dim})."
            )
        if preprocess.dim != self.feature_dim:
            raise ConfigValueError(
                f"data={self.name} serves {self.feature_dim}-d feature vectors, but the model "
                f"takes {preprocess.dim}-d inputs; set model.input_dim={self.feature_dim}."
            )
        self.preprocess = preprocess

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        names = ["train", *(["val"] if self.use_val else []), *self.test_sets]
        for split in names:
            self._splits[split] = Rows(self.data.splits[split])
        log.info(
            "%s: %d-d vectors, %d groups, split sizes %s",
            self.name,
            self.feature_dim,
            self.data.num_groups,
            {k: len(v) for k, v in self._splits.items()},
        )
