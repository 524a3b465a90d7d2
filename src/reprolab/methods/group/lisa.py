"""LISA: selective mixup within a label or within an attribute (SubpopBench `LISA`; spec §1.7).

Yao et al., "Improving Out-of-Distribution Robustness via Selective Augmentation" (ICML 2022, arXiv
2201.00299), as SubpopBench runs it (`YyzHarry/SubpopBench` `subpopbench/learning/algorithms.py`,
class `LISA`, L786-939; defaults `hparams_registry.py` L83-86). One step on a batch (x, y, a), with
a the spurious attribute (g = y·|A| + a, `reprolab.methods.group.irm.batch_attributes`):

1. With probability p_sel, *intra-label* LISA: for each class c with at least two attribute values
   in the batch, two of those values a1 ≠ a2 drawn at random; the first k samples of (c, a1) are
   paired in order with the first k of (c, a2), k the smaller count. Otherwise *intra-attribute*
   LISA: the same with the roles swapped (per attribute value, two labels y1 ≠ y2).
2. Each pair is mixed: `mixup` (λ ~ Beta(α, α) per pair; x̃ = λ x1 + (1 − λ) x2 and the one-hot
   targets alike) or `cutmix` on images (one λ and one box per class / attribute value: each of the
   2k images gets the other's box; the targets mix with the box's exact area ratio). On vectors
   `cutmix` is mixup, as upstream (which cut-mixes images only).
3. Rounds of step 1-2 (fresh attribute/label pairs and λ) are repeated until at least B mixed samples
   exist; they are shuffled and the first B kept. If a round has no pair (intra-label with one
   attribute value in the batch, or no class with two; intra-attribute likewise), the batch is
   used unmixed.
4. loss = CE(f(x̃), ỹ) with the soft targets ỹ (the batch mean).

Choices, against the two upstream codes:
- SubpopBench's single-batch form is followed. The LISA authors' code (`huaxiuyao/LISA`,
  `subpopulation_shifts/train.py`, `mix_forward`, `run_epoch_mix_every_batch`) draws one batch per
  group from four group loaders and mixes whole group batches ((g0, g1), (g2, g3) intra-label,
  (g0, g2), (g1, g3) intra-attribute, `mix_ratio` 0.5, `mix_alpha` 2). With `data.sampler=
  group_balanced` the batches here are group-balanced in expectation; they are not split per group.
- The LISA code's cutmix draws its λ from Beta(`alpha`, `alpha`) with `alpha` = 0.2 (its argparse
  default), not `mix_alpha`; SubpopBench uses `LISA_alpha` for both, as here.
- Token ids (text) cannot be mixed: the featurizer output is mixed instead and the head reads it
  (`cutmix` is then mixup, as on vectors).
  # DEVIATION: SubpopBench's LISA mixes `x` whatever the data (its Mixup has a text branch that
  # mixes features, LISA has none), which on BERT's token-id tensors is not a valid input; the
  # feature-level mix follows its Mixup's text branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod
from reprolab.methods.group.irm import batch_attributes, num_attributes
from reprolab.methods.group.mixup import beta_sample

MIX_METHODS = ("mixup", "cutmix")

Pairs = list[tuple[Tensor, Tensor]]


def _random_two(values: Tensor) -> tuple[Tensor, Tensor]:
    pick = values[torch.randperm(len(values)).to(values.device)[:2]]
    return pick[0], pick[1]


def lisa_pairs(labels: Tensor, attrs: Tensor, intra_label: bool, num_classes: int) -> Pairs:
    """One round of LISA's pairing: per class (intra-label) or attribute value (intra-attribute),
    index tensors (i, j) of equal length k, sample i[n] to be mixed with j[n]. Empty: no pair."""
    pairs: Pairs = []
    if intra_label:  # same label, two attribute values
        key_of, others, keys = labels, attrs, list(range(num_classes))
    else:  # same attribute value, two labels
        key_of, others, keys = attrs, labels, torch.unique(attrs).tolist()
    if len(torch.unique(others)) < 2:  # upstream: no pair anywhere, the batch stays unmixed
        return pairs
    for key in keys:
        idx = torch.nonzero(key_of == key).flatten()
        vals = torch.unique(others[idx])
        if len(vals) < 2:
            continue
        v1, v2 = _random_two(vals)
        i, j = idx[others[idx] == v1], idx[others[idx] == v2]
        k = min(len(i), len(j))
        pairs.append((i[:k], j[:k]))
    return pairs


def mixup_pairs(
    x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, lam: Tensor
) -> tuple[Tensor, Tensor]:
    """Per pair λ x1 + (1 − λ) x2 and λ y1 + (1 − λ) y2 (λ: (k,), y one-hot (k, C))."""
    lx = lam.to(x1).reshape(-1, *([1] * (x1.dim() - 1)))
    ly = lam.to(y1).reshape(-1, 1)
    return lx * x1 + (1 - lx) * x2, ly * y1 + (1 - ly) * y2


def cutmix_box(shape: torch.Size, lam: float) -> tuple[int, int, int, int]:
    """A box (lo2, lo3, hi2, hi3) over dims 2 and 3 of an (N, C, H, W) batch, side fraction
    √(1 − λ), centred at a uniform position and clipped (upstream `_rand_bbox`)."""
    s2, s3 = int(shape[2]), int(shape[3])
    cut = (1.0 - lam) ** 0.5
    w2, w3 = int(s2 * cut), int(s3 * cut)
    c2, c3 = int(torch.randint(s2, ())), int(torch.randint(s3, ()))

    def clip(v: int, hi: int) -> int:
        return min(max(v, 0), hi)

    lo2, lo3 = clip(c2 - w2 // 2, s2), clip(c3 - w3 // 2, s3)
    return lo2, lo3, clip(c2 + w2 // 2, s2), clip(c3 + w3 // 2, s3)


def cutmix_pairs(
    x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, box: tuple[int, int, int, int]
) -> tuple[Tensor, Tensor]:
    """[x1; x2] with each image's box replaced by its partner's; targets mixed by the kept area.
    ((2k, C, H, W), (2k, num_classes))"""
    k = len(x1)
    images, targets = torch.cat([x1, x2]), torch.cat([y1, y2])
    partner = torch.cat([torch.arange(k) + k, torch.arange(k)]).to(images.device)
    lo2, lo3, hi2, hi3 = box
    images[:, :, lo2:hi2, lo3:hi3] = images[partner, :, lo2:hi2, lo3:hi3]
    lam = 1.0 - (hi2 - lo2) * (hi3 - lo3) / (images.shape[-1] * images.shape[-2])
    return images, lam * targets + (1.0 - lam) * targets[partner]


def lisa_batch(
    x: Tensor,
    labels: Tensor,
    attrs: Tensor,
    num_classes: int,
    intra_label: bool,
    alpha: float,
    mix_method: str = "mixup",
    lam_fn: Callable[[int], Tensor] | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """LISA's mixed batch: (inputs (B, ...), soft targets (B, C) float32, whether it mixed).

    `lam_fn(k)` gives k mixing weights (default: Beta(α, α) draws; cutmix uses the first).
    """
    draw = lam_fn or (lambda k: beta_sample(alpha, k))
    onehot = F.one_hot(labels.long(), num_classes).float()
    cut = mix_method == "cutmix" and x.dim() == 4
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    total, bs = 0, len(x)
    while total < bs:
        pairs = lisa_pairs(labels, attrs, intra_label, num_classes)
        if not pairs:
            return x, onehot, False
        for i, j in pairs:
            if cut:
                box = cutmix_box(x.shape, float(draw(1)[0]))
                mx, my = cutmix_pairs(x[i], x[j], onehot[i], onehot[j], box)
            else:
                mx, my = mixup_pairs(x[i], x[j], onehot[i], onehot[j], draw(len(i)))
            xs.append(mx)
            ys.append(my)
            total += len(mx)
    order = torch.randperm(total).to(x.device)[:bs]
    return torch.cat(xs)[order], torch.cat(ys)[order], True


class LISA(GroupMethod):
    """LISA's selective augmentation with a linear head (see the module docstring).

    Args:
        alpha: Beta(α, α) of the mixing weights (SubpopBench `LISA_alpha`, 2.0).
        p_sel: probability of intra-label LISA in a step (SubpopBench `LISA_p_sel`, 0.5).
        mix_method: `mixup` or `cutmix` (SubpopBench `LISA_mixup_method`, `mixup`; cutmix applies to
            images only).
        **kwargs: see `GroupMethod`.
    """

    mixes_inputs = True

    def __init__(
        self,
        *args: Any,
        alpha: float = 2.0,
        p_sel: float = 0.5,
        mix_method: str = "mixup",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if mix_method not in MIX_METHODS:
            raise ConfigValueError(
                f"method={self.name}: mix_method must be one of {list(MIX_METHODS)}, got "
                f"{mix_method!r}."
            )
        if alpha <= 0 or not 0.0 <= p_sel <= 1.0:
            raise ConfigValueError(
                f"method={self.name}: needs alpha > 0 and 0 <= p_sel <= 1, got alpha={alpha}, "
                f"p_sel={p_sel}."
            )
        self.alpha = float(alpha)
        self.p_sel = float(p_sel)
        self.mix_method = mix_method
        self.n_attributes = num_attributes(self.num_groups, len(self.classnames), self.name)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        groups, labels = self.batch_groups(batch), batch["label"]
        attrs = batch_attributes(groups, labels, self.n_attributes, self.name)
        intra_label = bool(torch.rand(()) <= self.p_sel)  # upstream: np.random.random() <= p_sel
        x = batch["image"]
        tokens = not x.is_floating_point()
        if tokens:  # text: mix the featurizer output (module docstring)
            x = self.image_features(x)
        x, targets, mixed = lisa_batch(
            x,
            labels,
            attrs,
            len(self.classnames),
            intra_label,
            self.alpha,
            self.mix_method,
        )
        logits = (self.head_logits(x) if tokens else self.logits(x)).float()
        loss = F.cross_entropy(logits, targets.to(logits), label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lisa_intra_label", float(intra_label))
        self.log("train/lisa_mixed", float(mixed))
        return loss
