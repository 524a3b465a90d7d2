"""ERM: the mean cross-entropy of the batch (SubpopBench `ERM`; spec robustness_ood_prompting.md §1.7).

With `data.sampler=group_balanced` (`VectorGroupDataModule`: `group_balanced: true`) it is
SubpopBench's `ReSample` (group_DRO's `--reweight_groups` ERM).
"""

from __future__ import annotations

from torch import Tensor

from reprolab.methods.group.base import GroupMethod


class ERM(GroupMethod):
    """Empirical risk minimisation with a linear head (see `GroupMethod`)."""

    def train_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        return per_sample.mean()
