"""WiSE-FT: weight-space ensembles of zero-shot and fine-tuned CLIP (Wortsman et al., CVPR 2022, arXiv
2109.01903; robust_finetuning.md §2.6).

θ_α = (1 − α) θ_ZS + α θ_FT over every entry of the classifier (image tower, BatchNorm statistics
included, and the linear head). θ_ZS is the pretrained image tower with the zero-shot head
(exp(logit_scale) · w_c, bias 0); θ_FT is a finished fine-tuned run (`source`): an FT / LP-FT run's
image tower and trained head, or a FLYP / CaRot run's image tower with the zero-shot head rebuilt from
its fine-tuned text tower and scale (CaRot's `wise_ft.py`). Post-hoc: one run evaluates every α of
`alphas` on every test set; `alpha`'s numbers are the run's `test/...` keys (the table's WiSE-FT
row), each α's are logged as `wise/alpha<α>/<set>/<metric>`.

Optional Fisher weighting (Matena & Raffel, "Merging models with Fisher-weighted averaging",
NeurIPS 2022; wise-ft's `--fisher`): θ = ((1−α) F₀ θ₀ + α F₁ θ₁) / ((1−α) F₀ + α F₁), F floored at
1e-8, F the diagonal empirical Fisher of each model (squared gradients of the log-likelihood of labels
sampled from the model's own prediction) on `fisher_batches` train batches.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from reprolab.methods.base import shift_average
from reprolab.methods.finetuning.base import FineTuningMethod, normalized
from reprolab.methods.finetuning.source import SourceRun, check_shapes
from reprolab.models.clip import zeroshot_head

log = logging.getLogger(__name__)

Classifier = dict[str, Tensor]  # image-tower state (`visual.<key>`) + `head.weight`, `head.bias`


def interpolate(zs: Classifier, ft: Classifier, alpha: float) -> Classifier:
    """(1 − α) zs + α ft for floating entries; integer entries (BatchNorm's counter) from `ft`."""
    return {
        k: torch.lerp(zs[k].float(), ft[k].float(), alpha).to(zs[k].dtype)
        if zs[k].is_floating_point()
        else ft[k].clone()
        for k in zs
    }


def fisher_merge(
    zs: Classifier, ft: Classifier, f_zs: Classifier, f_ft: Classifier, alpha: float
) -> Classifier:
    """Fisher-weighted merge; entries without a Fisher (buffers) are interpolated linearly."""
    out = interpolate(zs, ft, alpha)
    for k in f_zs:
        a, b = (1 - alpha) * f_zs[k].clamp(min=1e-8), alpha * f_ft[k].clamp(min=1e-8)
        out[k] = ((a * zs[k].float() + b * ft[k].float()) / (a + b)).to(zs[k].dtype)
    return out


class WiseFT(FineTuningMethod):
    """Evaluates θ_α for every α of `alphas` in one post-hoc run (`model.trainable=none`).

    Args:
        source: the fine-tuned run, `{run_dir, experiment}` (`experiment` names the command that
            makes it in the error when it is missing).
        alphas: the mixing coefficients evaluated (0 = zero-shot, 1 = fine-tuned).
        alpha: the headline coefficient, logged as the run's `test/...` keys (0.5).
        fisher: Fisher-weighted instead of linear interpolation.
        fisher_batches: train batches for each model's Fisher.
        **kwargs: see `FineTuningMethod`.
    """

    trainable_modes = ("none",)

    def __init__(
        self,
        *args: Any,
        source: Any = None,
        alphas: list[float] | tuple[float, ...] = tuple(i / 10 for i in range(11)),
        alpha: float = 0.5,
        fisher: bool = False,
        fisher_batches: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.alphas = [float(a) for a in alphas]
        self.alpha = float(alpha)
        if self.alpha not in self.alphas:
            self.alphas.append(self.alpha)
        self.fisher = bool(fisher)
        self.fisher_batches = int(fisher_batches)
        self.source = SourceRun.parse(self.name, source)
        # Checked and read now: a missing or foreign run fails before anything is evaluated.
        self._source_state = self.source.load(self.name, getattr(self.backbone, "name", None))
        check_shapes(
            self.name, self.source, self._source_state, self.visual, "backbone.model.visual."
        )
        self.alpha_metrics = nn.ModuleList(
            nn.ModuleList(
                MetricCollection({k: m.clone() for k, m in coll.items()})
                if isinstance(coll, MetricCollection)
                else copy.deepcopy(coll)
                for coll in self.test_metrics
            )
            for _ in self.alphas
        )
        self._ends: tuple[Classifier, Classifier] | None = None
        self._fishers: tuple[Classifier, Classifier] | None = None
        self._current: float | None = None

    @property
    def visual(self) -> nn.Module:
        """The backbone's image tower (not registered twice)."""
        return self.backbone.model.visual

    # -- the two end points ---------------------------------------------------------------------
    def _zeroshot(self) -> Classifier:
        w = (
            self.backbone.zeroshot_weights(self.classnames, self.templates)
            * self.backbone.logit_scale
        )
        state = {f"visual.{k}": v.detach().clone() for k, v in self.visual.state_dict().items()}
        return {**state, "head.weight": w.detach().clone(), "head.bias": torch.zeros(w.shape[0])}

    def _finetuned(self) -> Classifier:
        sd = self._source_state
        visual = check_shapes(self.name, self.source, sd, self.visual, "backbone.model.visual.")
        state = {f"visual.{k}": v for k, v in visual.items()}
        if "head.weight" in sd:  # FT / LP-FT: the trained linear head
            return {**state, "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]}
        # FLYP / CaRot: the zero-shot head of the fine-tuned text tower, times its learned scale.
        tuned = copy.deepcopy(self.backbone.model)
        model_state = check_shapes(self.name, self.source, sd, tuned, "backbone.model.")
        tuned.load_state_dict(model_state)
        tokenizer = self.backbone.tokenizer

        def encode(texts: list[str]) -> Tensor:
            return tuned.encode_text(tokenizer(texts).to(tuned.logit_scale.device))

        with torch.no_grad():
            w = zeroshot_head(encode, self.classnames, self.templates) * tuned.logit_scale.exp()
        return {**state, "head.weight": w, "head.bias": torch.zeros(w.shape[0])}

    def setup(self, stage: str) -> None:
        if self._ends is None:
            zs, ft = self._zeroshot(), self._finetuned()
            dev = self.device
            self._ends = (
                {k: v.to(dev) for k, v in zs.items()},
                {k: v.to(dev) for k, v in ft.items()},
            )
            self._source_state = {}

    def on_test_start(self) -> None:
        if self.fisher and self._fishers is None:
            loader = self.trainer.datamodule.train_dataloader()
            self._fishers = tuple(self._fisher_of(end, loader) for end in self._ends)

    def _load(self, weights: Classifier) -> None:
        visual = {k[len("visual.") :]: v for k, v in weights.items() if k.startswith("visual.")}
        self.visual.load_state_dict(visual)
        self._head = (weights["head.weight"], weights["head.bias"])

    def set_alpha(self, alpha: float) -> None:
        """Put θ_α in place (image tower and head)."""
        if self._current == alpha:
            return
        zs, ft = self._ends
        if self.fisher:
            weights = fisher_merge(zs, ft, *self._fishers, alpha)
        else:
            weights = interpolate(zs, ft, alpha)
        self._load(weights)
        self._current = alpha

    def _fisher_of(self, weights: Classifier, loader) -> Classifier:
        """Diagonal empirical Fisher of the classifier `weights` on `fisher_batches` batches."""
        self._load(weights)
        self._current = None
        w, b = (t.clone().requires_grad_(True) for t in self._head)
        params = dict(self.visual.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        sums = {k: torch.zeros_like(p) for k, p in params.items()}
        sums["head.weight"], sums["head.bias"] = torch.zeros_like(w), torch.zeros_like(b)
        n = 0
        with torch.enable_grad():
            for i, batch in enumerate(loader):
                if i >= self.fisher_batches:
                    break
                for x in batch["image"].to(self.device):
                    logits = normalized(self.image_features(x[None])) @ w.t() + b
                    y = torch.distributions.Categorical(logits=logits).sample()
                    grads = torch.autograd.grad(
                        F.cross_entropy(logits, y), [*params.values(), w, b], allow_unused=True
                    )
                    for k, g in zip([*params, "head.weight", "head.bias"], grads, strict=True):
                        if g is not None:
                            sums[k] += g.detach() ** 2
                    n += 1
        for p in params.values():
            p.requires_grad_(False)
        return {
            (f"visual.{k}" if not k.startswith("head.") else k): v / max(n, 1)
            for k, v in sums.items()
        }

    # -- evaluation -----------------------------------------------------------------------------
    def head_logits(self, features: Tensor) -> Tensor:
        w, b = self._head
        return normalized(features) @ w.t() + b

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        for i, alpha in enumerate(self.alphas):
            self.set_alpha(alpha)
            if alpha == self.alpha:  # the headline: the base routine (test/... keys, σ_min)
                super().test_step(batch, batch_idx, dataloader_idx)
            if self.test_specs[dataloader_idx].role == "ood":
                continue
            with torch.no_grad():
                raw = self.logits(batch["image"])
            self._update(
                self.alpha_metrics[i][dataloader_idx],
                batch,
                self.test_index_groups[dataloader_idx],
                raw=raw,
            )

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        out: dict[str, float] = {}
        shift = [t.name for t in self.test_specs if t.role == "shift"]
        for alpha, collections in zip(self.alphas, self.alpha_metrics, strict=True):
            values: dict[str, float] = {}
            for spec, coll in zip(self.test_specs, collections, strict=True):
                if spec.role == "ood":
                    continue
                for k, v in coll.compute().items():
                    if k == "group":
                        continue
                    v = float(v)
                    values[f"test/{spec.name}/{k}"] = 100.0 * v if k.endswith("acc") else v
                coll.reset()
            values.update(shift_average(values, shift))
            out.update(
                {k.replace("test/", f"wise/alpha{alpha:g}/", 1): v for k, v in values.items()}
            )
        self.log_dict(out, add_dataloader_idx=False)

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "wise/*")
