"""SAM and ASAM with a linear head on grouped data (spec robustness_ood_prompting.md §1.7, §2.4).

Both passes use the batch's mean cross-entropy (the SIL-ASGDRO code's `--asam` baseline: "adaptive
SAM with ERM loss in both steps"). One step, with Lightning's manual optimisation:

    1. L(w) = mean CE at w; backward; ε from its gradient (`reprolab.optim.sam.SAM.first_step`);
       BatchNorm running statistics are updated in this pass;
    2. at w + ε, with BatchNorm running statistics frozen: the second-pass loss; backward;
    3. gradient clipping (method.grad_clip), w restored, the base optimiser's step, the LR
       scheduler's step.

`SharpnessAware` is the shared step; a subclass changes the second-pass loss (`ASGDRO`).

ASAM's perturbation has two released forms (`reprolab.optim.sam`): `adaptive_params: weights` with
`asam_eta: 0.01` is the ASAM authors' (`SamsungLabs/ASAM`: only `*weight` tensors adapted, biases get
SAM's perturbation); `adaptive_params: all` with `asam_eta: 0` is davda54's `adaptive=True`, the one
the SIL-ASGDRO code uses for ASGDRO and for its ASAM baseline.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod
from reprolab.optim.sam import SAM, frozen_bn_stats, unscaled_params

ADAPTIVE_PARAMS = ("all", "weights")


class SharpnessAware(GroupMethod):
    """A group method whose step is a two-pass sharpness-aware one (SAM; ASAM with `adaptive`).

    Args:
        rho: perturbation radius ρ.
        adaptive: ASAM's adaptive perturbation (False: SAM).
        asam_eta: ASAM's η in T = |w| + η.
        adaptive_params: `all` (every tensor adapted: davda54 / SIL-ASGDRO) or `weights` (only
            tensors named `*weight`; biases get T = 1: SamsungLabs/ASAM).
        **kwargs: see `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        asam_eta: float = 0.0,
        adaptive_params: str = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rho < 0 or asam_eta < 0:
            raise ConfigValueError(
                f"method={self.name}: rho and asam_eta must be >= 0, got rho={rho}, "
                f"asam_eta={asam_eta}."
            )
        if adaptive_params not in ADAPTIVE_PARAMS:
            raise ConfigValueError(
                f"method={self.name}: adaptive_params must be one of {list(ADAPTIVE_PARAMS)}, got "
                f"{adaptive_params!r}."
            )
        self.automatic_optimization = False
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.asam_eta = float(asam_eta)
        self.adaptive_params = adaptive_params
        self._sam: SAM | None = None

    def sam_for(self, optimizer: Any) -> SAM:
        """The SAM wrapper around `optimizer` (rebuilt when Lightning hands out a new one)."""
        if self._sam is None or self._sam.base_optimizer is not optimizer:
            unscaled = unscaled_params(self) if self.adaptive_params == "weights" else ()
            self._sam = SAM(
                None,
                optimizer,
                rho=self.rho,
                adaptive=self.adaptive,
                eta=self.asam_eta,
                unscaled=unscaled,
            )
        return self._sam

    # -- the two losses -------------------------------------------------------------------------
    def perturbation_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        """The loss whose gradient at w sets ε: the uniform mean (every method here)."""
        return per_sample.mean()

    def sharpness_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        """The loss at w + ε whose gradient steps w (SAM / ASAM: the mean)."""
        return per_sample.mean()

    # -- one step -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        sam = self.sam_for(opt)
        images, labels, groups = batch["image"], batch["label"], self.batch_groups(batch)

        if self._backbone_trains:
            logits_now = functools.partial(self.logits, images)
        else:  # a frozen featurizer gives the same features at w and w + ε: encode once
            logits_now = functools.partial(self.head_logits, self.image_features(images))

        # pass 1 at w (BatchNorm running statistics updated)
        first = self.perturbation_loss(self.per_sample_loss(logits_now(), labels), groups)
        opt.zero_grad()
        self.manual_backward(first)
        sam.first_step(zero_grad=True)

        # pass 2 at w + ε (BatchNorm running statistics frozen)
        with frozen_bn_stats(self):
            per_sample = self.per_sample_loss(logits_now(), labels)
        loss = self.sharpness_loss(per_sample, groups)
        self.manual_backward(loss)
        self.configure_gradient_clipping(opt)
        sam.second_step(zero_grad=True)  # w restored, then the base step with ∇loss(w + ε)
        self._step_schedulers()

        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/loss_at_w", first.detach())
        if sam.last_grad_norm is not None:
            self.log("train/grad_norm", sam.last_grad_norm)
        self.log_group_terms(per_sample, groups)
        return loss.detach()

    def _step_schedulers(self) -> None:
        scheds = self.lr_schedulers()
        if scheds is None:
            return
        for s in scheds if isinstance(scheds, list) else [scheds]:
            s.step()


class SAMMethod(SharpnessAware):
    """SAM (Foret et al., ICLR 2021): ε = ρ g / ‖g‖, ERM loss in both passes."""

    def __init__(self, *args: Any, adaptive: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, adaptive=adaptive, **kwargs)


class ASAMMethod(SharpnessAware):
    """ASAM (Kwon et al., ICML 2021): ε = ρ T² g / ‖T g‖, T = |w| + η, ERM loss in both passes."""

    def __init__(self, *args: Any, adaptive: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, adaptive=adaptive, **kwargs)
