"""BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning (Oh et al., CVPR 2023,
arXiv 2303.14773).

The Coordinator (frozen encoder + learnable trigger vector and decoder) emits an input-dependent,
image-shaped prompt; the prompted image is clamp(x + eps * h(x)) in normalised pixel space; the
decoder and trigger are trained with SPSA-GC from cross-entropy on the black-box logits
(spec `blackvip.md` §2-§3). BlackVIP-SE is not implemented (its mechanism is unknown).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from reprolab.methods.prompting.coordinator import Coordinator
from reprolab.methods.prompting.prompters import clamp_normalized
from reprolab.methods.prompting.zeroth_order import ZerothOrderPrompting
from reprolab.optim.spsa import SPSA


class BlackVIP(ZerothOrderPrompting):
    """Coordinator prompts trained by SPSA(-GC) through a query-only oracle.

    Args:
        coordinator: kwargs of `Coordinator` (encoder, src_dim, pretrained, ...); the image size
            comes from the target model.
        eps: prompt scale ε (`P_EPS`, per dataset).
        spsa: kwargs of `SPSA` (a, c, alpha, gamma, o, momentum, n_perturb, perturb, gc).
        seed: seed of the perturbation generator (the run seed: identical on every DDP rank).
        max_rows: decode at most this many perturbations at once (memory).
    """

    def __init__(
        self,
        *args: Any,
        coordinator: dict[str, Any],
        eps: float = 1.0,
        spsa: dict[str, Any] | None = None,
        seed: int = 1,
        max_rows: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.coordinator = Coordinator(image_size=self.preprocess.image_size, **dict(coordinator))
        self.eps = eps
        self.max_rows = max_rows
        self.optimizer = SPSA(
            self.coordinator.learnable_parameters(), seed=seed, **dict(spsa or {})
        )
        self._z: Tensor | None = None

    def _clamp(self, x: Tensor) -> Tensor:
        return clamp_normalized(x, self.preprocess.mean, self.preprocess.std)

    def prepare_step(self, images: Tensor) -> None:
        # The frozen encoder's feature is the same for every perturbation: compute it once per step
        # (the official code recomputes it 2q times; results are identical, spec §3).
        self._z = self.coordinator.encode(images)

    def prompted_batched(self, images: Tensor, thetas: Tensor) -> Tensor:
        z = self._z if self._z is not None else self.coordinator.encode(images)
        prompts = self.coordinator.decode_batched(z, thetas, max_rows=self.max_rows)
        return self._clamp(images.unsqueeze(0) + self.eps * prompts)  # (R, B, 3, S, S)

    def prompted(self, images: Tensor) -> Tensor:
        return self._clamp(images + self.eps * self.coordinator(images))  # (B, 3, S, S)
