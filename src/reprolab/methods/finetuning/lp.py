"""Linear probes of the robust fine-tuning tables (robust_finetuning.md §2.2): both released variants.

- `solver: adamw` (CaRot's `--method lp --freeze-encoder`): a freshly initialised linear head on the
  frozen image tower, CE, AdamW with the warmup-cosine schedule.
- `solver: lbfgs` (FLYP's `linear_lbfgs.py`): scikit-learn's L-BFGS logistic regression over a grid
  of inverse regularisation strengths C, warm-started; C is chosen by accuracy on the data module's
  held-out `val` split, never on test (the released script selects on the evaluation set: pitfall
  P26). Post-hoc: it fits at test start from the train and val loaders, then evaluates.

# DEVIATION: both variants read L2-normalised features (the released code leaves them unnormalised)
# so that the head is the same map as FT's (`FineTune.head_logits`) and an `lp` run can start LP-FT
# (`lp_ft source=...`). Scale aside, a linear probe on normalised features is the same model class.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.base import normalized
from reprolab.methods.finetuning.ft import FineTune

log = logging.getLogger(__name__)

SOLVERS = ("adamw", "lbfgs")


class LinearProbeFT(FineTune):
    """A linear probe on frozen CLIP image features (`model.trainable=none`).

    Args:
        solver: `adamw` (trained with the runner) or `lbfgs` (fitted at test start; post-hoc).
        lbfgs_c_grid: `[low, high, count]`: C over `np.logspace(log10(low), log10(high), count)`
            (FLYP: 0.1 .. 100, 100 values).
        lbfgs_max_iter: L-BFGS iterations per C (FLYP: 200).
        **kwargs: see `FineTune` (`head_init: random` for the released probes).
    """

    trainable_modes = ("none",)

    def __init__(
        self,
        *args: Any,
        solver: str = "adamw",
        lbfgs_c_grid: tuple[float, float, int] = (0.1, 100.0, 100),
        lbfgs_max_iter: int = 200,
        head_init: str = "random",
        **kwargs: Any,
    ) -> None:
        if solver not in SOLVERS:
            raise ConfigValueError(
                f"method=lp: solver must be one of {list(SOLVERS)}, got {solver!r}."
            )
        if bool(kwargs.get("post_hoc", False)) != (solver == "lbfgs"):
            raise ConfigValueError(
                "method=lp: L-BFGS fits at test time and AdamW trains, so method.post_hoc must be "
                f"{solver == 'lbfgs'} with solver={solver}; set method.post_hoc="
                f"{str(solver == 'lbfgs').lower()}."
            )
        super().__init__(*args, head_init=head_init, **kwargs)
        self.solver = solver
        self.c_grid = tuple(lbfgs_c_grid)
        self.lbfgs_max_iter = int(lbfgs_max_iter)
        self._fitted = False

    def image_features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return super().image_features(images)

    def on_test_start(self) -> None:
        if self.solver == "lbfgs" and not self._fitted:
            self.fit_lbfgs()

    @torch.no_grad()
    def _features(self, loader) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for batch in loader:
            xs.append(normalized(self.image_features(batch["image"].to(self.device))).cpu())
            ys.append(batch["label"])
        return torch.cat(xs).double().numpy(), torch.cat(ys).numpy()

    def fit_lbfgs(self) -> None:
        """Fit the head by L-BFGS for every C of the grid; keep the C with the best val accuracy."""
        from sklearn.linear_model import LogisticRegression

        dm = self.trainer.datamodule
        val = dm.val_dataloader()
        if not val:
            raise ConfigValueError(
                f"method={self.name} solver=lbfgs chooses C on a held-out split, and data={dm.name} "
                "has none: set data.val=true."
            )
        x_tr, y_tr = self._features(dm.train_dataloader())
        x_va, y_va = self._features(val)
        low, high, count = self.c_grid
        grid = np.logspace(np.log10(low), np.log10(high), int(count))
        clf = LogisticRegression(max_iter=self.lbfgs_max_iter, warm_start=True)
        best = (-1.0, None, None, None)
        for c in grid:
            clf.set_params(C=float(c))
            clf.fit(x_tr, y_tr)
            acc = float((clf.predict(x_va) == y_va).mean())
            if acc > best[0]:
                best = (acc, float(c), clf.coef_.copy(), clf.intercept_.copy())
        acc, c, coef, intercept = best
        log.info(
            "lp (L-BFGS): C=%.4g chosen on val (acc %.2f%%) from %d values", c, 100 * acc, len(grid)
        )
        w = torch.zeros_like(self.head.weight)
        b = torch.zeros_like(self.head.bias)
        classes = torch.as_tensor(clf.classes_, dtype=torch.long)
        if len(classes) == 2 and w.shape[0] == 2:  # sklearn's binary form: one row for class 1
            w[1], b[1] = torch.as_tensor(coef[0]).to(w), float(intercept[0])
        else:
            w[classes] = torch.as_tensor(coef).to(w)
            b[classes] = torch.as_tensor(intercept).to(b)
        self.head.weight.copy_(w)
        self.head.bias.copy_(b)
        self.lbfgs_c, self.lbfgs_val_acc = c, acc
        self._fitted = True

    def extra_metrics(self) -> dict[str, float]:
        if self.solver == "lbfgs" and self._fitted:
            return {"lp/lbfgs_C": self.lbfgs_c, "lp/lbfgs_val_acc": 100.0 * self.lbfgs_val_acc}
        return {}

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "lp/*")
