"""ASGDRO: adaptive sharpness-aware GroupDRO (SIL; spec robustness_ood_prompting.md §2.1-§2.3).

Code: `MLAI-Yonsei/SIL-ASGDRO` @ c9217d7, `subpopulation_shifts/train.py` (`run_epoch` with
`--asgdro`), `loss.py` (group_DRO's `LossComputer`), `sam.py` (davda54's SAM, `adaptive=True`),
`bypass_bn.py`. One step:

    1. L̄(w) = mean CE over the batch (the uniform loss: `train_loss_computer` has
       `is_robust=False` under `--asgdro`); backward; ε = ρ w² ⊙ g / (‖|w| ⊙ g‖ + 1e-12), every
       parameter adapted; BatchNorm running statistics updated in this pass;
    2. at w + ε with BatchNorm running statistics frozen: group losses L_e(w + ε), the GroupDRO
       update q_e ← q_e exp(η (L_e + C/√n_e)), renormalised, and R = Σ_e q_e L_e(w + ε); backward;
    3. w restored, base step with ∇R(w + ε).

With ρ = 0 it is GroupDRO; with one group it is ASAM (the SIL code's `--asam`).
q is group_DRO's: absent groups are updated with L_e = 0 (`update_absent: true`, which matters only
with an adjustment C > 0; see `reprolab.methods.group.groupdro`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from reprolab.methods.group.groupdro import GroupWeights
from reprolab.methods.group.sam import SharpnessAware


class ASGDRO(SharpnessAware):
    """ASAM's perturbation from the uniform loss, GroupDRO's robust loss at w + ε.

    Args:
        eta: GroupDRO step size η (the SIL code's `robust_step_size`).
        adjustment: group_DRO's generalisation adjustment C (`generalization_adjustment`).
        update_absent: update q of groups absent from the batch too (group_DRO's rule).
        rho, asam_eta, adaptive_params: the perturbation (see `SharpnessAware`); ASGDRO's code uses
            `asam_eta=0`, `adaptive_params=all`.
        **kwargs: see `SharpnessAware` / `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        eta: float = 0.01,
        adjustment: float | Sequence[float] = 0.0,
        update_absent: bool = True,
        adaptive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, adaptive=adaptive, **kwargs)
        self.dro = GroupWeights(self.num_groups, eta, adjustment, update_absent, self.name)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.dro.setup_from(self._trainer.datamodule if self._trainer is not None else None)

    def sharpness_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        loss, _, _ = self.dro(per_sample, groups)
        self.log_dict(self.dro.stats())
        return loss
