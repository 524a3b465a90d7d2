"""DFR: Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", ICLR 2023, arXiv 2204.02937; spec
robustness_ood_prompting.md §1.7).

DFR^Val_Tr as the official code runs it (`PolinaKirichenko/deep_feature_reweighting`,
`dfr_evaluate_spurious.py`, defaults `--balance_dfr_val True --notrain_dfr_val True`): the featurizer
of a finished ERM run (`source`) is frozen and only the last layer is retrained, post-hoc, with
scikit-learn's L1-penalised logistic regression (`liblinear`) on group-balanced subsets of the
validation split:

1. features of the validation split (and of the train split, for the standardisation);
2. C is tuned (`dfr_on_validation_tune`): the validation split is halved at random; one half,
   subsampled to equal group counts (every group cut to the smallest), standardised with its own
   mean and scale, fits one model per C of `c_options`; the C with the best worst-group accuracy on
   the other half wins (the first such C in `c_options` order on a tie), summed over
   `tune_retrains` random halvings;
3. the head (`dfr_on_validation_eval`): `num_retrains` models with that C, each on a fresh
   group-balanced subset of the whole validation split, standardised with the train split's mean and
   scale; their weights and intercepts are averaged.

The head is that average with the standardisation folded in (w/σ, b − w·μ/σ), in the linear head the
group methods evaluate (`GroupMethod.head_logits`); for two classes the sklearn row is class 1's and
class 0's row is zero, so the softmax is sklearn's `predict_proba`.

# DEVIATION (SubpopBench's `DFR`): SubpopBench trains the last layer with SGD on CE + dfr_reg·‖W‖₁
# (dfr_reg 0.1) for the run's steps on one group-balanced subsample of the validation split
# (`subsample_type='group'`), without standardisation or a C search; here it is the official fit.
# DEVIATION: with more than two classes each class gets its own binary L1 logistic regression (one vs
# rest, what `liblinear` did before scikit-learn 1.8 refused it); the official code is binary only.
# The random draws (halvings, subsets) come from `numpy.random.default_rng(subset_seed)` and
# liblinear's from `liblinear_seed` (the official script leaves both unseeded).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.base import normalized
from reprolab.methods.finetuning.source import SourceRun, SourceRunError
from reprolab.methods.group.base import GroupMethod
from reprolab.methods.group.jtt import ordered_batches, train_split
from reprolab.utils.run_record import METRICS_FILE

log = logging.getLogger(__name__)

C_OPTIONS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # official, Waterbirds (`C_OPTIONS`)


def balanced_indices(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a group-balanced subset: every group present cut, at random, to the smallest."""
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    m = min(len(i) for i in members)
    return np.concatenate([rng.permutation(i)[:m] for i in members])


def l1_logreg(c: float, seed: int) -> Any:
    """scikit-learn's L1 logistic regression with liblinear (the official `LogisticRegression(
    penalty="l1", C=c, solver="liblinear")`; `l1_ratio=1` from scikit-learn 1.8 on)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    version = re.match(r"(\d+)\.(\d+)", sklearn.__version__)
    l1 = {"penalty": "l1"}
    if version and (int(version[1]), int(version[2])) >= (1, 8):
        l1 = {"l1_ratio": 1.0}
    return LogisticRegression(C=float(c), solver="liblinear", random_state=int(seed), **l1)


def fit_l1_logreg(
    x: np.ndarray, y: np.ndarray, c: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and intercepts: (1, D), (1,) for two classes (class 1's), else (K, D), (K,) one vs rest."""
    y = np.asarray(y)
    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise ConfigValueError(
            f"DFR: the balanced validation subset has no example of class(es) {missing}; the "
            "validation split must hold every class."
        )
    if num_classes == 2:
        m = l1_logreg(c, seed).fit(x, y)
        return m.coef_.copy(), m.intercept_.copy()
    rows = [l1_logreg(c, seed).fit(x, (y == k).astype(int)) for k in range(num_classes)]
    return np.concatenate([m.coef_ for m in rows]), np.concatenate([m.intercept_ for m in rows])


def decision(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Predicted classes of the sklearn form (binary: class 1 when the score is positive)."""
    scores = x @ coef.T + intercept
    return (scores[:, 0] > 0).astype(int) if coef.shape[0] == 1 else scores.argmax(1)


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """The smallest accuracy over the groups present."""
    return float(min((pred[g == k] == y[g == k]).mean() for k in np.unique(g)))


def standardizer(x: np.ndarray | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of `StandardScaler` fitted on `x` (zero variance: scale 1); identity if None."""
    if x is None:
        return np.zeros(dim), np.ones(dim)
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(x)
    return s.mean_.copy(), s.scale_.copy()


def tune_c(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    c_options: tuple[float, ...],
    num_classes: int,
    rng: np.random.Generator,
    retrains: int = 1,
    standardize: bool = True,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The official `dfr_on_validation_tune` (no train data, balanced): (best C, C -> summed WGA)."""
    scores = {float(c): 0.0 for c in c_options}
    for _ in range(retrains):
        idx = rng.permutation(len(x))
        held, fit = idx[: len(x) // 2], idx[len(x) // 2 :]
        fit = fit[balanced_indices(g[fit], rng)]
        mean, scale = standardizer(x[fit] if standardize else None, x.shape[1])
        x_fit, x_held = (x[fit] - mean) / scale, (x[held] - mean) / scale
        for c in scores:
            coef, b = fit_l1_logreg(x_fit, y[fit], c, num_classes, seed)
            scores[c] += worst_group_accuracy(decision(coef, b, x_held), y[held], g[held])
    best = max(scores, key=lambda c: scores[c])  # the first maximum, in c_options order
    return best, scores


def fit_averaged(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    c: float,
    num_classes: int,
    rng: np.random.Generator,
    mean: np.ndarray,
    scale: np.ndarray,
    retrains: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The official `dfr_on_validation_eval`: (mean weights, mean intercepts, examples per fit)."""
    coefs, intercepts = [], []
    n = 0
    for _ in range(retrains):
        idx = balanced_indices(g, rng)
        coef, b = fit_l1_logreg((x[idx] - mean) / scale, y[idx], c, num_classes, seed)
        coefs.append(coef)
        intercepts.append(b)
        n = len(idx)
    return np.mean(coefs, axis=0), np.mean(intercepts, axis=0), n


def linear_head(
    coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray, num_classes: int
) -> tuple[Tensor, Tensor]:
    """A (C, D) weight and (C,) bias on raw features from a fit on standardised ones."""
    w = coef / scale  # (K, D)
    b = intercept - w @ mean  # (K,)
    if coef.shape[0] == 1 and num_classes == 2:  # sklearn's binary form: class 1's row
        w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    return torch.as_tensor(w, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)


class DFR(GroupMethod):
    """A finished run's frozen featurizer and a last layer refitted on balanced validation data.

    Post-hoc (`train=false`): the head is fitted at test start, then the test sets are evaluated.

    Args:
        source: the finished ERM run, `{run_dir, experiment}` (`experiment` names the command that
            makes it in the error when it is missing). Its featurizer weights are loaded when its
            checkpoint holds them; a run whose featurizer was frozen (`model.trainable=none`) kept
            none, and the featurizer is `cfg.model` as built (pretrained, or seeded by `seed`).
        c_options: inverse L1 strengths searched (a single value: no search).
        num_retrains: fits averaged for the head (official: 20).
        tune_retrains: random halvings of the validation split whose scores are summed (official: 1).
        standardize: standardise the features (official `preprocess=True`).
        subset_seed: seed of the halvings and balanced subsets.
        liblinear_seed: liblinear's `random_state`.
        **kwargs: see `GroupMethod` (`normalize`: L2-normalise the features first).
    """

    def __init__(
        self,
        *args: Any,
        source: Any = None,
        c_options: tuple[float, ...] | list[float] = C_OPTIONS,
        num_retrains: int = 20,
        tune_retrains: int = 1,
        standardize: bool = True,
        subset_seed: int = 0,
        liblinear_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name", "dfr")
        if not kwargs.get("post_hoc", False):
            raise ConfigValueError(
                f"method={name} fits its last layer at test time (nothing for the trainer); set "
                "method.post_hoc=true."
            )
        kwargs["head_init"] = "random"  # replaced by the fit
        super().__init__(*args, **kwargs)
        self.c_options = tuple(float(c) for c in c_options)
        if not self.c_options or min(self.c_options) <= 0:
            raise ConfigValueError(
                f"method={name}: c_options must list positive values, got {list(c_options)}."
            )
        for key, v in (("num_retrains", num_retrains), ("tune_retrains", tune_retrains)):
            if int(v) < 1:
                raise ConfigValueError(f"method={name}: {key} must be >= 1, got {v}.")
        self.num_retrains, self.tune_retrains = int(num_retrains), int(tune_retrains)
        self.standardize = bool(standardize)
        self.subset_seed, self.liblinear_seed = int(subset_seed), int(liblinear_seed)
        self.source = SourceRun.parse(self.name, source)
        # Checked and read now: a missing, unfinished or foreign run fails before any work.
        state = self.source.load(self.name, getattr(self.backbone, "name", None))
        self._check_source_data()
        self._source_head_shape = (
            tuple(state["head.weight"].shape) if "head.weight" in state else None
        )
        self.loaded_featurizer = self._load_featurizer(state)
        self.freeze("backbone")
        self._backbone_trains = False
        self.fit_record: dict[str, float] | None = None

    # -- the source run -------------------------------------------------------------------------
    def _check_source_data(self) -> None:
        record = json.loads((Path(self.source.run_dir) / METRICS_FILE).read_text())
        data = record.get("data")
        if data not in (None, self.info.name):
            raise SourceRunError(
                f"method={self.name}: the run {self.source.run_dir} trained on data={data}, not "
                f"data={self.info.name}; point method.source at a run on this data or make one: "
                f"{self.source.command()} data={self.info.name}"
            )

    def _load_featurizer(self, state: dict[str, Tensor]) -> int:
        """Put the run's featurizer weights (`backbone.*`) in place; the number of tensors."""
        sub = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        own = self.backbone.state_dict()
        bad = sorted(k for k in sub if k not in own or tuple(own[k].shape) != tuple(sub[k].shape))
        if bad:
            raise SourceRunError(
                f"method={self.name}: the checkpoint of {self.source.run_dir} does not match "
                f"model={getattr(self.backbone, 'name', '?')} (backbone.{bad[0]} and {len(bad) - 1} "
                f"more); make a matching run: {self.source.command()}"
            )
        if sub:
            self.backbone.load_state_dict(sub, strict=False)
        log.info(
            "%s: featurizer of %s (%s)",
            self.name,
            self.source.run_dir,
            f"{len(sub)} tensors loaded" if sub else "frozen there: the model as built",
        )
        return len(sub)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        shape = tuple(self.head.weight.shape)
        if self._source_head_shape not in (None, shape):
            raise SourceRunError(
                f"method={self.name}: the head of {self.source.run_dir} has shape "
                f"{self._source_head_shape}, this task needs {shape}; {self.source.command()}"
            )

    # -- the fit --------------------------------------------------------------------------------
    def head_input(self, features: Tensor) -> Tensor:
        """What the head reads: the features, L2-normalised with `normalize`."""
        return normalized(features) if self.normalize else features

    @torch.no_grad()
    def features(self, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Head inputs (float64), labels and groups (None without groups) of the batches."""
        xs, ys, gs = [], [], []
        for batch in batches:
            f = self.head_input(self.image_features(batch["image"].to(self.device)))
            xs.append(f.double().cpu())
            ys.append(torch.as_tensor(batch["label"]).cpu())
            if "group" in batch:
                gs.append(torch.as_tensor(batch["group"]).cpu())
        g = torch.cat(gs).numpy() if gs and len(gs) == len(xs) else None
        return torch.cat(xs).numpy(), torch.cat(ys).numpy(), g

    def on_test_start(self) -> None:
        if self.fit_record is None:
            self.fit_last_layer(self.trainer.datamodule)

    def fit_last_layer(self, datamodule: Any) -> dict[str, float]:
        """Tune C, fit and average the balanced models, and put the head in place."""
        val = datamodule.val_dataloader()
        if not val:
            raise ConfigValueError(
                f"method={self.name} retrains the last layer on the validation split, and "
                f"data={datamodule.name} serves none: set data.val=true."
            )
        was_training = self.training
        self.eval()
        x, y, g = self.features(val)
        if g is None:
            raise ConfigValueError(
                f"method={self.name} balances the validation split by group, and the validation "
                f"batches of data={datamodule.name} carry no `group`."
            )
        x_train = None
        if self.standardize:  # official: the head's scaler is fitted on the train features
            bs = int(getattr(datamodule, "eval_batch_size", 256))
            batches = ordered_batches(
                train_split(datamodule), bs, getattr(datamodule, "num_workers", 0)
            )
            x_train = self.features(batches)[0]
        self.train(was_training)
        k = len(self.classnames)
        rng = np.random.default_rng(self.subset_seed)
        if len(self.c_options) > 1:
            c, scores = tune_c(
                x,
                y,
                g,
                self.c_options,
                k,
                rng,
                retrains=self.tune_retrains,
                standardize=self.standardize,
                seed=self.liblinear_seed,
            )
        else:
            c, scores = self.c_options[0], {self.c_options[0]: float("nan")}
        mean, scale = standardizer(x_train, x.shape[1])
        coef, intercept, n = fit_averaged(
            x, y, g, c, k, rng, mean, scale, self.num_retrains, self.liblinear_seed
        )
        w, b = linear_head(coef, intercept, mean, scale, k)
        with torch.no_grad():
            self.head.weight.copy_(w.to(self.head.weight))
            self.head.bias.copy_(b.to(self.head.bias))
        counts = np.bincount(g)
        self.fit_record = {
            "dfr/C": float(c),
            "dfr/balanced_examples": float(n),
            "dfr/balanced_per_group": float(n // max(len(np.unique(g)), 1)),
            "dfr/val_examples": float(len(x)),
            "dfr/tune_worst_group_acc": 100.0 * scores[c] / self.tune_retrains,
            "dfr/nonzero_weights": float(np.count_nonzero(coef)),
        }
        log.info(
            "%s: C=%g (tuned worst-group acc %.2f%%), %d fits on %d balanced validation examples "
            "(%d per group; val group counts %s)",
            self.name,
            c,
            self.fit_record["dfr/tune_worst_group_acc"],
            self.num_retrains,
            n,
            self.fit_record["dfr/balanced_per_group"],
            counts.tolist(),
        )
        return self.fit_record

    def extra_metrics(self) -> dict[str, float]:
        return dict(self.fit_record or {})

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "dfr/*")
