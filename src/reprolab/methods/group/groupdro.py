"""GroupDRO, online (Sagawa et al., ICLR 2020; spec robustness_ood_prompting.md §1.2 step 2, §1.7, §2.2).

Per batch: L_g, the mean cross-entropy over the batch's samples of group g; then

    q_g ← q_g · exp(η · (L_g + C_g / √n_g))      for the groups g in the batch
    q ← q / Σ q                                  (q: a buffer over all G groups, 1/G at the start)
    loss = Σ_g q_g L_g                           (absent groups have no L_g and add nothing)

with n_g the number of training items of group g and C the generalisation adjustment (0 by default).
This is SubpopBench's `GroupDRO._compute_loss` (`subpopbench/learning/algorithms.py`), where C = 0,
with group_DRO's adjustment (`kohpangwei/group_DRO` `loss.py`, `compute_robust_loss`; the same file
ships with `MLAI-Yonsei/SIL-ASGDRO`). The q update uses the losses' values only (no gradient).

Upstream differences, all invisible when C = 0:
- group_DRO's `LossComputer` updates every group, an absent one with L_g = 0, so with C > 0 an
  absent group still gains exp(η C_g / √n_g); SubpopBench touches only the groups present.
  `update_absent` picks group_DRO's rule (ASGDRO's default, its code being group_DRO's).
- group_DRO adds the adjustment to the group losses in place, so its *reported* robust loss includes
  Σ q_g C_g/√n_g (a constant: the gradient is the same). Here the loss is Σ q_g L_g.
- group_DRO applies the adjustment only when every C_g > 0 (`torch.all(self.adj > 0)`); here
  each group gets its own C_g / √n_g. # DEVIATION: differs only for a per-group C with zeros in it.
- A group with no training item (n_g = 0) gets no adjustment (group_DRO would divide by zero).
  # DEVIATION: such a group never appears in a batch, so only `update_absent` with C > 0 can tell.
- q starts at 1/G (group_DRO); SubpopBench starts at ones, which is the same after the first
  renormalisation, and the loss is only ever computed with a renormalised q.

`update_group_weights` and `group_mean_losses` are pure functions (SCER's L_dro uses them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod, group_mean_losses, train_group_counts


def update_group_weights(
    q: Tensor,
    group_losses: Tensor,
    present_mask: Tensor,
    eta: float,
    adjustment: Tensor | None = None,
) -> Tensor:
    """One exponentiated-gradient step of GroupDRO's group weights: a new q on the simplex. (G,)

    q_g ← q_g · exp(η (L_g + adjustment_g)) where `present_mask` is True, unchanged elsewhere; then
    q / Σ q. Pure: `q` is not modified, and nothing here carries a gradient.

    Args:
        q: current weights (G,), non-negative, not all zero.
        group_losses: L_g (G,) (values at absent groups are ignored).
        present_mask: bool (G,): the groups to update (those in the batch; all for group_DRO's rule).
        eta: step size η (SubpopBench `groupdro_eta`, group_DRO `robust_step_size`).
        adjustment: C_g / √n_g (G,) (group_DRO's generalisation adjustment), or None for 0.
    """
    step = group_losses.detach().to(q.dtype)
    if adjustment is not None:
        step = step + adjustment.detach().to(device=q.device, dtype=q.dtype)
    step = torch.where(present_mask.to(q.device).bool(), eta * step, torch.zeros_like(step))
    step = step - step.max()  # a common factor: the same q after renormalising, and no overflow
    new = q.detach() * step.exp()
    return new / new.sum()


def generalization_adjustment(c: Tensor, counts: Tensor) -> Tensor:
    """C_g / √n_g per group, 0 where n_g = 0 (float64 in, float32 out). (G,)"""
    counts = counts.double()
    adj = c.double() / counts.clamp(min=1).sqrt()
    return torch.where(counts > 0, adj, torch.zeros_like(adj)).float()


def _adjustment_vector(adjustment: float | Sequence[float], num_groups: int, name: str) -> Tensor:
    values = (
        [float(adjustment)]
        if isinstance(adjustment, (int, float))
        else [float(a) for a in adjustment]
    )
    if len(values) == 1:
        values = values * num_groups
    if len(values) != num_groups or any(v < 0 for v in values):
        raise ConfigValueError(
            f"method={name}: adjustment must be one number >= 0 or {num_groups} of them (one per "
            f"group), got {adjustment!r}."
        )
    return torch.tensor(values, dtype=torch.float64)


class GroupWeights(nn.Module):
    """GroupDRO's online group weights q (a checkpointed buffer) and the robust loss of a batch.

    Args:
        num_groups: G.
        eta: step size η of the q update.
        adjustment: generalisation adjustment C (one value or one per group; 0: none).
        update_absent: also update groups absent from the batch, with L_g = 0 (group_DRO's rule;
            differs from SubpopBench's only when C > 0).
        name: the method's name, for messages.
    """

    def __init__(
        self,
        num_groups: int,
        eta: float,
        adjustment: float | Sequence[float] = 0.0,
        update_absent: bool = False,
        name: str = "groupdro",
    ) -> None:
        super().__init__()
        if eta < 0:
            raise ConfigValueError(f"method={name}: eta must be >= 0, got {eta}.")
        self.num_groups = int(num_groups)
        self.eta = float(eta)
        self.update_absent = bool(update_absent)
        self.name = name
        self.c = _adjustment_vector(adjustment, self.num_groups, name)
        self.register_buffer("q", torch.full((self.num_groups,), 1.0 / self.num_groups))
        self.register_buffer("adjust", torch.zeros(self.num_groups), persistent=False)
        self.has_counts = False

    @property
    def needs_counts(self) -> bool:
        return bool((self.c > 0).any())

    def set_group_counts(self, counts: Tensor | None) -> None:
        """Train items per group n_g: sets C_g / √n_g (a one-line error when C > 0 and none)."""
        if counts is None:
            if self.needs_counts:
                raise ConfigValueError(
                    f"method={self.name}: adjustment > 0 needs the number of training items per "
                    "group, and the data module gives none (no train_group_counts() and no group "
                    "labels on its train split); set method.adjustment=0."
                )
            return
        counts = torch.as_tensor(counts).double().flatten()
        if counts.numel() != self.num_groups:
            raise ConfigValueError(
                f"method={self.name}: the train split has {counts.numel()} group counts, the task "
                f"{self.num_groups} groups."
            )
        self.adjust.copy_(generalization_adjustment(self.c, counts).to(self.adjust))
        self.has_counts = True

    def setup_from(self, datamodule: Any) -> None:
        """Read the train group counts from `datamodule` when the adjustment needs them."""
        if self.needs_counts:
            self.set_group_counts(train_group_counts(datamodule, self.num_groups))

    def forward(self, per_sample: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Update q from this batch, then return `(Σ q_g L_g, L (G,), counts (G,))`."""
        if self.needs_counts and not self.has_counts:
            raise RuntimeError(f"method={self.name}: group counts were never set (setup_from).")
        losses, counts = group_mean_losses(per_sample, groups, self.num_groups)
        present = torch.ones_like(counts, dtype=torch.bool) if self.update_absent else counts > 0
        adj = self.adjust if self.needs_counts else None
        with torch.no_grad():
            self.q.copy_(update_group_weights(self.q, losses, present, self.eta, adj))
        robust = (self.q.to(losses.dtype) * losses).sum()
        return robust, losses, counts

    def stats(self) -> dict[str, Tensor]:
        """`train/q_max` and `train/q_entropy` (nats) of the current q."""
        q = self.q.detach()
        entropy = -(q * q.clamp(min=1e-30).log()).sum()
        return {"train/q_max": q.max(), "train/q_entropy": entropy}


class GroupDRO(GroupMethod):
    """Online GroupDRO with a linear head (see the module docstring).

    Args:
        eta: step size η of the q update (SubpopBench `groupdro_eta`, 1e-2).
        adjustment: group_DRO's generalisation adjustment C (0: none).
        update_absent: group_DRO's update of absent groups (matters only with C > 0).
        **kwargs: see `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        eta: float = 0.01,
        adjustment: float | Sequence[float] = 0.0,
        update_absent: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dro = GroupWeights(self.num_groups, eta, adjustment, update_absent, self.name)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.dro.setup_from(self._trainer.datamodule if self._trainer is not None else None)

    def train_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        loss, _, _ = self.dro(per_sample, groups)
        self.log_dict(self.dro.stats())
        return loss
