"""CORAL: match feature means and covariances across environments (SubpopBench `CORAL`; spec §1.7).

Sun and Saenko, "Deep CORAL" (ECCV-W 2016), in SubpopBench's form (`YyzHarry/SubpopBench`
`subpopbench/learning/algorithms.py`, `AbstractMMD` with `kernel_type = "mean_cov"`, L508-576, and
`CORAL`, L586-590). One step on a batch `{image, label, group}`: h = the featurizer output (the input
of the linear head), the environments e present in the batch (sorted), and

    d(x, z) = mean_k (μ_x − μ_z)_k² + mean_kl (C_x − C_z)_kl²       (C: unbiased covariance, / (n − 1))
    penalty = mean over pairs e < e' of d(h_e, h_e')                (0 with a single environment)
    loss = CE(head(h), y) + mmd_gamma · penalty                     (CE: the batch mean)

Environments are the spurious attribute's values (`environments: attribute`, upstream's
`return_attributes(a)`) or the groups (`environments: group`); see `reprolab.methods.group.irm`.

Notes:
- With `normalize` (a zero-shot head on L2-normalised features) h is the normalised feature, the
  vector the head reads, as upstream's classifier reads the featurizer output.
- With a frozen featurizer (`model.trainable=none`) h carries no gradient: the penalty is logged but
  cannot change the head, and CORAL trains as ERM.
- An environment with one sample in the batch has upstream covariance 0/0 = NaN; here its
  covariance is 0 (the n − 1 is clamped at 1). # DEVIATION: NaN-free only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.base import normalized
from reprolab.methods.group.base import GroupMethod
from reprolab.methods.group.irm import check_environments, environment_index, num_attributes


def coral_distance(x: Tensor, z: Tensor) -> Tensor:
    """Mean squared difference of the means plus that of the covariances of x (n, d), z (m, d)."""
    mean_x, mean_z = x.mean(0, keepdim=True), z.mean(0, keepdim=True)
    cx, cz = x - mean_x, z - mean_z
    cov_x = cx.T @ cx / max(len(x) - 1, 1)
    cov_z = cz.T @ cz / max(len(z) - 1, 1)
    return (mean_x - mean_z).pow(2).mean() + (cov_x - cov_z).pow(2).mean()


def coral_penalty(features: Tensor, envs: Tensor) -> Tensor:
    """Mean CORAL distance over the pairs of environments present in the batch. ()"""
    parts = [features[envs == e] for e in torch.unique(envs)]
    penalty = features.new_zeros(())
    pairs = 0
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            penalty = penalty + coral_distance(parts[i], parts[j])
            pairs += 1
    return penalty / max(pairs, 1)


class CORAL(GroupMethod):
    """ERM plus the CORAL penalty on the featurizer output (see the module docstring).

    Args:
        mmd_gamma: weight of the penalty (SubpopBench `mmd_gamma`, 1.0).
        environments: `attribute` (SubpopBench: the spurious attribute a) or `group`.
        **kwargs: see `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        mmd_gamma: float = 1.0,
        environments: str = "attribute",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_environments(environments, self.name)
        if mmd_gamma < 0:
            raise ConfigValueError(f"method={self.name}: mmd_gamma must be >= 0, got {mmd_gamma}.")
        self.mmd_gamma = float(mmd_gamma)
        self.environments = environments
        self.n_attributes = (
            num_attributes(self.num_groups, len(self.classnames), self.name)
            if environments == "attribute"
            else 1
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        groups, labels = self.batch_groups(batch), batch["label"]
        envs = environment_index(groups, labels, self.n_attributes, self.environments, self.name)
        feats = self.image_features(batch["image"])
        h = normalized(feats) if self.normalize else feats  # (B, D): what the head reads
        logits = self.head(h).float()
        per_sample = self.per_sample_loss(logits, labels)
        ce = per_sample.mean()
        penalty = coral_penalty(h.float(), envs)
        loss = ce + self.mmd_gamma * penalty
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce.detach())
        self.log("train/coral_penalty", penalty.detach())
        self.log_group_terms(per_sample, groups)
        return loss
