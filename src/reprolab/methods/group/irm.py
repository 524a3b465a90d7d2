"""IRM: the IRMv1 penalty over environments (SubpopBench `IRM`; spec robustness_ood_prompting.md §1.7).

Arjovsky et al., "Invariant Risk Minimization" (arXiv 1907.02893), as SubpopBench runs it
(`YyzHarry/SubpopBench` `subpopbench/learning/algorithms.py`, class `IRM`, L455-487). One step on a
batch `{image, label, group}`, with the environments e present in the batch:

    R_e(s) = CE(s · logits_e, y_e)                       (mean over the batch samples of e)
    P_e = ∂R_e^even/∂s · ∂R_e^odd/∂s  at s = 1           (even / odd positions within e)
    loss = mean_e R_e(1) + λ_t · mean_e P_e,   λ_t = irm_lambda if t >= anneal_iters else 1

with t the number of steps taken before this one (upstream's `update_count` buffer, checkpointed).
Both means are over the environments present, so the risk term is environment-balanced, not the
batch mean. Environments are the values of the spurious attribute a (`environments: attribute`,
upstream's `return_attributes(a)`), or the groups (`environments: group`).

Upstream differences:
- No optimizer reset at the end of the anneal: SubpopBench keeps its SGD state (DomainBed's IRM
  rebuilds its Adam optimizer when t reaches anneal_iters; SubpopBench's code does not), and so does
  this class.
- An environment with one sample in the batch has an empty odd half, where upstream's penalty is
  NaN; here it adds 0 to the penalty (its risk still counts). # DEVIATION: NaN-free only.

The spurious attribute is read from the group index, g = y·|A| + a with |A| = num_groups /
num_classes (every group dataset here, and SubpopBench's `y * num_attributes + a`); `batch_attributes`
checks that g // |A| is the label. LISA and CORAL use the same helpers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod

ENVIRONMENTS = ("attribute", "group")


def num_attributes(num_groups: int, num_classes: int, name: str) -> int:
    """|A| of the group layout g = y·|A| + a; a one-line error when it does not divide."""
    if num_classes < 1 or num_groups < num_classes or num_groups % num_classes:
        raise ConfigValueError(
            f"method={name} reads the spurious attribute a from the group g = y·|A| + a, which "
            f"needs num_groups ({num_groups}) to be a multiple of the number of classes "
            f"({num_classes}); this data's groups are not laid out that way."
        )
    return num_groups // num_classes


def batch_attributes(groups: Tensor, labels: Tensor, n_attributes: int, name: str) -> Tensor:
    """The attribute a = g mod |A| of every sample, after checking g // |A| == y. (B,)"""
    groups = groups.to(labels.device).long()
    if not torch.equal(torch.div(groups, n_attributes, rounding_mode="floor"), labels.long()):
        raise ValueError(
            f"method={name}: the batch's groups are not y·{n_attributes} + a (g // {n_attributes} "
            "differs from the label), so the spurious attribute cannot be read from them."
        )
    return groups % n_attributes


def environment_index(
    groups: Tensor, labels: Tensor, n_attributes: int, environments: str, name: str
) -> Tensor:
    """Per sample its environment: the attribute a or the group g. (B,)"""
    if environments == "group":
        return groups.to(labels.device).long()
    return batch_attributes(groups, labels, n_attributes, name)


def check_environments(environments: str, name: str) -> None:
    if environments not in ENVIRONMENTS:
        raise ConfigValueError(
            f"method={name}: environments must be one of {list(ENVIRONMENTS)}, got "
            f"{environments!r}."
        )


def irm_penalty(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """IRMv1's penalty of one environment: ∂R_even/∂s · ∂R_odd/∂s at s = 1 (SubpopBench
    `_irm_penalty`). With fewer than 2 samples: 0 (see the module docstring). Differentiable."""
    if len(labels) < 2:
        return logits.sum() * 0.0
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    grads = []
    for half in (slice(0, None, 2), slice(1, None, 2)):
        risk = F.cross_entropy(logits[half] * scale, labels[half], label_smoothing=label_smoothing)
        grads.append(autograd.grad(risk, [scale], create_graph=True)[0])
    return grads[0] * grads[1]


def irm_terms(
    logits: Tensor, labels: Tensor, envs: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(mean_e R_e, mean_e P_e) over the environments present in the batch (sorted order)."""
    nll = logits.new_zeros(())
    penalty = logits.new_zeros(())
    values = torch.unique(envs)
    for e in values:
        mask = envs == e
        nll = nll + F.cross_entropy(logits[mask], labels[mask], label_smoothing=label_smoothing)
        penalty = penalty + irm_penalty(logits[mask], labels[mask], label_smoothing)
    return nll / len(values), penalty / len(values)


class IRM(GroupMethod):
    """IRMv1 with a linear head (see the module docstring).

    Args:
        irm_lambda: penalty weight once annealed (SubpopBench `irm_lambda`, 1e2).
        anneal_iters: steps with penalty weight 1 first (SubpopBench `irm_penalty_anneal_iters`, 500).
        environments: `attribute` (SubpopBench: the spurious attribute a) or `group` (g = (y, a)).
        **kwargs: see `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        irm_lambda: float = 100.0,
        anneal_iters: int = 500,
        environments: str = "attribute",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_environments(environments, self.name)
        if irm_lambda < 0 or anneal_iters < 0:
            raise ConfigValueError(
                f"method={self.name}: irm_lambda and anneal_iters must be >= 0, got "
                f"irm_lambda={irm_lambda}, anneal_iters={anneal_iters}."
            )
        self.irm_lambda = float(irm_lambda)
        self.anneal_iters = int(anneal_iters)
        self.environments = environments
        self.n_attributes = (
            num_attributes(self.num_groups, len(self.classnames), self.name)
            if environments == "attribute"
            else 1
        )
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def penalty_weight(self) -> float:
        """λ_t: 1 during the anneal, irm_lambda after it (SubpopBench's rule)."""
        return self.irm_lambda if int(self.update_count) >= self.anneal_iters else 1.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        groups, labels = self.batch_groups(batch), batch["label"]
        envs = environment_index(groups, labels, self.n_attributes, self.environments, self.name)
        logits = self.logits(batch["image"]).float()
        nll, penalty = irm_terms(logits, labels, envs, self.label_smoothing)
        weight = self.penalty_weight()
        loss = nll + weight * penalty
        self.update_count += 1
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll", nll.detach())
        self.log("train/irm_penalty", penalty.detach())
        self.log("train/irm_weight", weight)
        self.log_group_terms(self.per_sample_loss(logits.detach(), labels), groups)
        return loss
