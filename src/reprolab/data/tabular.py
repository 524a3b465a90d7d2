"""Tabular data for generative and fairness baselines: a synthetic causal table and sklearn's diabetes.

What fair / causal VAEs (VFAE, CEVAE, counterfactually fair VAEs) build on: a table whose columns
have a kind (continuous, binary, categorical), one of which is the sensitive attribute and one the
target. The data module publishes a `TabularInfo` and yields dict batches:

- `x`: float features (B, F), one block per column of `info.columns` in order: continuous columns
  standardised with train-split statistics, binary as 0/1, categorical one-hot (`Column.width`);
- `sensitive`: the sensitive attribute (B,) as long 0/1, where the table has one;
- `target`: the target (B,) in the same encoding as its block of `x` (standardised if continuous);
- `index`: row index within its split (B,).

`info.columns` describes `x`. The sensitive and target columns are part of `x` (the baseline VAE
models the whole row) unless listed in `exclude`; they are always emitted as their own keys.

Tables (`dataset=`):

`causal_table` — synthetic, drawn from a known structural causal model (`causal_table()`):

    U  ~ N(0, 1)                                    unobserved; not a column
    A  ~ Bernoulli(0.5)                             binary, sensitive; independent of U
    X1 = 1.0 A + 0.8 U + 0.6 e1                     continuous
    X2 = -0.8 A + 0.6 U + 0.6 e2                    continuous
    X3 ~ Bernoulli(sigmoid(2 U))                    binary, child of U only
    C  ~ Categorical(softmax(0, 1.5 U, -1.5 U, 1.5 A - 0.5))   4 levels
    Y  ~ Bernoulli(sigmoid(1.5 X1 + 1.0 X2 - 1.0))  binary target; depends on A only through X1, X2

with e1, e2 ~ N(0, 1) independent. `info.causal_graph` maps every node (U included, marked latent
by not being a column) to its parents. Train / val / test rows are one draw of
`n_train + n_val + n_test` rows from `numpy.random.default_rng(data_seed)`, split in that order, so
the table depends only on (`data_seed`, sizes), not on the run seed. The optional test set
`test_do_a1` (role `shift`) is the interventional distribution do(A=1): `n_test` rows drawn with
seed `data_seed + 1` and A set to 1 before its children are drawn.

`diabetes` — the 442-row table scikit-learn ships (Efron et al., "Least Angle Regression", Ann.
Statist. 2004), `sklearn.datasets.load_diabetes(scaled=False, as_frame=True)`: age, sex, bmi, bp,
s1-s6 (serum measurements) and `target` (disease progression one year after baseline), all
continuous except `sex`, the sensitive attribute, stored there as 1/2 and encoded here as sex - 1
(the release does not say which code is which sex). Fixed split: `default_rng(split_seed)
.permutation(442)` (split_seed 0), the first 310 rows train, the next 66 val, the last 66 test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from reprolab.data.base import TaskDataModule
from reprolab.data.info import Column, TabularInfo, TestSet
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)


@dataclass
class Table:
    """A raw table: columns (kinds), values per split, roles; nothing encoded yet."""

    columns: tuple[Column, ...]
    splits: dict[str, dict[str, np.ndarray]]  # split -> column -> (N,) raw values
    target: str | None = None
    sensitive: str | None = None
    causal_graph: dict[str, tuple[str, ...]] | None = None
    roles: dict[str, str] | None = None  # test split -> role (id / shift / ood)


# -- causal_table -----------------------------------------------------------------------------

CAUSAL_GRAPH: dict[str, tuple[str, ...]] = {
    "U": (),
    "A": (),
    "X1": ("A", "U"),
    "X2": ("A", "U"),
    "X3": ("U",),
    "C": ("A", "U"),
    "Y": ("X1", "X2"),
}
CAUSAL_COLUMNS: tuple[Column, ...] = (
    Column("A", "binary"),
    Column("X1", "continuous"),
    Column("X2", "continuous"),
    Column("X3", "binary"),
    Column("C", "categorical", 4),
    Column("Y", "binary"),
)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def causal_table(n: int, seed: int, do_a: int | None = None) -> dict[str, np.ndarray]:
    """`n` rows of the structural causal model in the module docstring, U included.

    Args:
        n: rows.
        seed: `numpy.random.default_rng` seed; the rows are a function of (n, seed, do_a).
        do_a: None for the observational distribution, else the intervention do(A=do_a).
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(n)
    a = (rng.random(n) < 0.5).astype(np.int64)
    if do_a is not None:
        a = np.full(n, int(do_a), dtype=np.int64)
    x1 = 1.0 * a + 0.8 * u + 0.6 * rng.standard_normal(n)
    x2 = -0.8 * a + 0.6 * u + 0.6 * rng.standard_normal(n)
    x3 = (rng.random(n) < _sigmoid(2.0 * u)).astype(np.int64)
    logits = np.stack([np.zeros(n), 1.5 * u, -1.5 * u, 1.5 * a - 0.5], axis=1)  # (n, 4)
    gumbel = -np.log(-np.log(rng.random((n, 4))))
    c = np.argmax(logits + gumbel, axis=1).astype(np.int64)  # Gumbel-max: a categorical draw
    y = (rng.random(n) < _sigmoid(1.5 * x1 + 1.0 * x2 - 1.0)).astype(np.int64)
    return {"U": u, "A": a, "X1": x1, "X2": x2, "X3": x3, "C": c, "Y": y}


def causal_table_log_prob(rows: dict[str, np.ndarray], nodes: int = 80) -> np.ndarray:
    """Exact log p(A, X1, X2, X3, C, Y) per row under the model (raw units; U integrated out by
    Gauss-Hermite quadrature with `nodes` points, exact to float precision at 80): (n,).

    The reference a density model of the table is measured against: on held-out rows the mean of
    any model's log-likelihood (and so of its ELBO) is at most the mean of this, up to sampling noise.
    """
    gx, gw = np.polynomial.hermite_e.hermegauss(nodes)  # nodes and weights for N(0, 1)
    u = gx[None, :]  # (1, Q)
    a, x1, x2, x3, c = (np.asarray(rows[k])[:, None] for k in ("A", "X1", "X2", "X3", "C"))

    def log_normal(v: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
        return -0.5 * ((v - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)

    def log_bernoulli(v: np.ndarray, logit: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, np.where(v == 1, -logit, logit))

    lp = log_normal(x1, 1.0 * a + 0.8 * u, 0.6) + log_normal(x2, -0.8 * a + 0.6 * u, 0.6)
    lp = lp + log_bernoulli(x3, 2.0 * u)
    logits = np.stack(np.broadcast_arrays(0.0 * u, 1.5 * u, -1.5 * u, 1.5 * a - 0.5), axis=-1)
    logits = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # (n, Q, 4)
    lp = lp + np.take_along_axis(logits, np.broadcast_to(c[..., None], lp.shape + (1,)), -1)[..., 0]
    out = np.logaddexp.reduce(lp + np.log(gw / gw.sum())[None], axis=1)  # (n,)
    y_logit = 1.5 * np.asarray(rows["X1"]) + 1.0 * np.asarray(rows["X2"]) - 1.0
    return out + log_bernoulli(np.asarray(rows["Y"]), y_logit) + np.log(0.5)  # + log p(A)


def _load_causal_table(
    n_train: int = 4000, n_val: int = 1000, n_test: int = 1000, data_seed: int = 0
) -> Table:
    rows = causal_table(n_train + n_val + n_test, data_seed)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val)}
    bounds["test"] = (n_train + n_val, n_train + n_val + n_test)
    splits = {s: {k: v[a:b] for k, v in rows.items()} for s, (a, b) in bounds.items()}
    splits["test_do_a1"] = causal_table(n_test, data_seed + 1, do_a=1)
    return Table(
        columns=CAUSAL_COLUMNS,
        splits=splits,
        target="Y",
        sensitive="A",
        causal_graph=dict(CAUSAL_GRAPH),
        roles={"test": "id", "test_do_a1": "shift"},
    )


# -- diabetes ---------------------------------------------------------------------------------

DIABETES_SPLIT = (310, 66, 66)  # train, val, test rows of the 442


def _load_diabetes(split_seed: int = 0) -> Table:
    from sklearn.datasets import load_diabetes  # ships with scikit-learn: no download

    frame = load_diabetes(scaled=False, as_frame=True).frame  # 442 rows
    if len(frame) != sum(DIABETES_SPLIT):
        raise RuntimeError(f"diabetes: expected {sum(DIABETES_SPLIT)} rows, got {len(frame)}.")
    values = {k: frame[k].to_numpy() for k in frame.columns}
    values["sex"] = (values["sex"] - 1).astype(np.int64)  # 1/2 -> 0/1
    order = np.random.default_rng(split_seed).permutation(len(frame))
    n_tr, n_va, _ = DIABETES_SPLIT
    parts = {"train": order[:n_tr], "val": order[n_tr : n_tr + n_va], "test": order[n_tr + n_va :]}
    columns = tuple(Column(k, "binary" if k == "sex" else "continuous") for k in frame.columns)
    return Table(
        columns=columns,
        splits={s: {k: v[idx] for k, v in values.items()} for s, idx in parts.items()},
        target="target",
        sensitive="sex",
        roles={"test": "id"},
    )


TABLES = {"causal_table": _load_causal_table, "diabetes": _load_diabetes}


def load_table(dataset: str, **kwargs: Any) -> Table:
    """The raw table `dataset` (`causal_table`, `diabetes`)."""
    if dataset not in TABLES:
        raise ValueError(unknown_name("tabular dataset", dataset, TABLES))
    return TABLES[dataset](**kwargs)


# -- encoding ---------------------------------------------------------------------------------


def column_slices(columns: Sequence[Column]) -> list[slice]:
    """Where each column's block sits in the encoded feature vector `x`."""
    out, start = [], 0
    for c in columns:
        out.append(slice(start, start + c.width))
        start += c.width
    return out


def _check_values(name: str, col: Column, v: np.ndarray) -> None:
    if col.kind == "binary" and not np.isin(v, (0, 1)).all():
        raise ValueError(f"{name}: binary column {col.name} holds values other than 0/1.")
    if col.kind == "categorical" and ((v < 0) | (v >= col.cardinality)).any():
        raise ValueError(
            f"{name}: categorical column {col.name} holds codes outside 0..{col.cardinality - 1}."
        )


class Rows(Dataset):
    """Tensors of one split with one row per sample (all of one length); indexed with a list of row
    indices (one batch per item)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx)
        return {k: v[i] for k, v in self.tensors.items()}


class EpochBatches(Sampler[list[int]]):
    """Batches of row indices in an order that depends on (seed, epoch) only.

    Train: a permutation per epoch, or with `weights` (balanced sampling) n draws with replacement,
    each row with probability proportional to its weight (group_DRO's `--reweight_groups`,
    SubpopBench's ReSample). Lightning calls `set_epoch`, so a resumed run sees the same order as an
    uninterrupted one. Eval: rows in order.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        weights: Tensor | None = None,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last = drop_last and n >= batch_size
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            if self.weights is not None:
                order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
            else:
                order = torch.randperm(self.n, generator=g)
            order = order.tolist()
        else:
            order = list(range(self.n))
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class RowsDataModule(TaskDataModule):
    """What the in-memory row data modules share (tables, group vectors, token ids): splits held
    as `Rows` in `self._splits`, served in whole batches by `EpochBatches` (seeded per epoch, so a
    resumed run sees the order an uninterrupted one would).

    A subclass sets `batch_size`, `eval_batch_size`, `shuffle_seed`, `num_workers`, `test_sets`
    and, where it has them, `use_val`, `drop_last` and `sampler` (null, `group_balanced`:
    rows drawn with replacement with weight 1 / size of their group, or `class_balanced`: the same
    with classes; read from the train split's `group` / `label` tensors).
    """

    use_val: bool = True
    drop_last: bool = True
    sampler: str | None = None

    def train_weights(self) -> Tensor | None:
        """Per training row 1 / (rows of its group, or class), or None for a plain shuffle. (N,)"""
        if self.sampler is None:
            return None
        t = self._splits["train"].tensors
        keys = t["group" if self.sampler == "group_balanced" else "label"]
        return 1.0 / torch.bincount(keys).double()[keys]

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self._splits[split]
        batches = EpochBatches(
            len(ds),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
            drop_last=train and self.drop_last,
            weights=self.train_weights() if train else None,
        )
        return DataLoader(
            ds,
            sampler=batches,
            batch_size=None,  # the sampler yields whole batches of indices
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if self.use_val else []

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(t, False) for t in self.test_sets]


class TabularDataModule(RowsDataModule):
    """Train / val / test splits of one table, encoded for a network; publishes `TabularInfo`.

    Args:
        name: data config name.
        dataset: table name (`causal_table`, `diabetes`).
        dataset_kwargs: the table's own arguments (sizes and `data_seed` for `causal_table`,
            `split_seed` for `diabetes`).
        exclude: columns left out of `x` (the sensitive attribute for methods that condition on
            it); the sensitive and target columns are still emitted as their own keys.
        test_sets: test splits to evaluate, the first being the primary one (default: all the
            table has: `test`, and `test_do_a1` for `causal_table`).
        batch_size: training batch size (the last incomplete batch is dropped).
        eval_batch_size: val / test batch size.
        shuffle_seed: seed of the per-epoch training order.
        num_workers: DataLoader workers (0: the tables are tiny and held in memory).
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        dataset_kwargs: dict[str, Any] | None = None,
        exclude: Sequence[str] = (),
        test_sets: Sequence[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self.dataset = dataset
        self.table = load_table(dataset, **dict(dataset_kwargs or {}))
        names = [c.name for c in self.table.columns]
        bad = [c for c in exclude if c not in names]
        if bad:
            raise ValueError(f"data={name}: " + unknown_name("column", bad[0], names))
        self.exclude = tuple(exclude)
        self.columns = tuple(c for c in self.table.columns if c.name not in self.exclude)
        if not self.columns:
            raise ValueError(f"data={name}: exclude={list(exclude)} leaves no column in `x`.")
        roles = self.table.roles or {"test": "id"}
        self.test_sets = list(test_sets or roles)
        for t in self.test_sets:
            if t not in roles:
                raise ValueError(f"data={name}: " + unknown_name("test set", t, roles))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle_seed = int(shuffle_seed)
        self.num_workers = int(num_workers)
        self.stats = self._train_stats()  # column -> (mean, std) of continuous columns
        self._splits: dict[str, Rows] = {}

    @property
    def info(self) -> TabularInfo:
        roles = self.table.roles or {"test": "id"}
        return TabularInfo(
            name=self.name,
            columns=self.columns,
            target=self.table.target,
            sensitive=self.table.sensitive,
            causal_graph=self.table.causal_graph,
            test_sets=tuple(TestSet(t, roles[t]) for t in self.test_sets),  # type: ignore[arg-type]
        )

    def _train_stats(self) -> dict[str, tuple[float, float]]:
        train = self.table.splits["train"]
        out = {}
        for c in self.table.columns:
            if c.kind == "continuous":
                v = train[c.name].astype(np.float64)
                std = float(v.std())
                out[c.name] = (float(v.mean()), std if std > 0 else 1.0)
        return out

    def encode_column(self, col: Column, v: np.ndarray) -> Tensor:
        """One column's block of `x`: (N, width)."""
        _check_values(self.name, col, v)
        if col.kind == "continuous":
            mean, std = self.stats[col.name]
            return torch.as_tensor((v - mean) / std, dtype=torch.float32)[:, None]
        if col.kind == "binary":
            return torch.as_tensor(v, dtype=torch.float32)[:, None]
        codes = torch.as_tensor(v.astype(np.int64))
        return torch.nn.functional.one_hot(codes, col.cardinality).float()

    def encode(self, split: str) -> dict[str, Tensor]:
        """The encoded tensors of one split (`x`, `sensitive`, `target`, `index`)."""
        raw = self.table.splits[split]
        by_name = {c.name: c for c in self.table.columns}
        x = torch.cat([self.encode_column(c, raw[c.name]) for c in self.columns], dim=1)  # (N, F)
        out = {"x": x}
        if self.table.sensitive is not None:
            out["sensitive"] = torch.as_tensor(raw[self.table.sensitive].astype(np.int64))
        if self.table.target is not None:
            t = by_name[self.table.target]
            enc = self.encode_column(t, raw[t.name])
            out["target"] = enc[:, 0] if t.width == 1 else enc.argmax(1)
        out["index"] = torch.arange(len(x))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for split in ("train", "val", *self.test_sets):
            self._splits[split] = Rows(self.encode(split))
        log.info(
            "%s: %d columns -> %d features, split sizes %s",
            self.name,
            len(self.columns),
            self.info.num_features,
            {k: len(v) for k, v in self._splits.items()},
        )
