"""Sharpness-aware minimisation as a two-pass wrapper around any torch optimiser.

SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) take the gradient at a perturbed
point w + ε and apply it at w:

    pass 1: g = ∇L(w)                         (the caller's forward + backward)
    ε = ρ · T² g / ‖T g‖₂                      (`first_step`; the norm runs over all parameters)
    pass 2: g' = ∇L'(w + ε)                    (the caller's forward + backward at w + ε)
    w ← base_step(w, g')                       (`second_step`: w restored exactly, then the base step)

SAM: T = I, so ε = ρ g / ‖g‖. ASAM (adaptive): T = diag(|w| + η) element-wise, so
ε = ρ (|w| + η)² ⊙ g / ‖(|w| + η) ⊙ g‖; with η = 0 this is ρ w² ⊙ g / ‖|w| ⊙ g‖ (robustness_ood_prompting
§2.2). The two released ASAM variants differ in which tensors are adapted:

- `SamsungLabs/ASAM` (`asam.py`, the ASAM authors' code): η = 0.01, and only parameters whose name
  contains `weight` get T = |w| + η (conv / linear / norm weights); every other tensor (biases)
  gets T = 1, the SAM perturbation. Pass those as `unscaled` (`unscaled_params(module)`).
- `davda54/sam` with `adaptive=True`, vendored by `MLAI-Yonsei/SIL-ASGDRO` (`sam.py`): η = 0 and
  every parameter adapted, biases included. ASGDRO and the SIL code's `--asam` baseline use it.

The denominator gets `eps` (1e-12, the davda54 / SIL value; `SamsungLabs/ASAM` adds 1e-16, a
difference far below float32 resolution of any non-zero gradient norm).

The wrapper works with manual optimisation (the caller runs both passes) and with anything that
hands it a base optimiser: under Lightning pass `self.optimizers()` (a `LightningOptimizer`), so that
`second_step` goes through the strategy (AMP, step counter). `state_dict` / `load_state_dict` are the
base optimiser's: the wrapper keeps no state between steps, and checkpoints hold only the base.

`frozen_bn_stats(module)` stops BatchNorm running-statistics updates while the second pass runs (the
SIL code's `disable_running_stats`): the forward pass still normalises with batch statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def unscaled_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters `SamsungLabs/ASAM` does not adapt: those whose name lacks `weight` (biases, ...).

    Upstream tests the full dotted name; this tests the tensor's own name (the last component), so a
    bias inside a module called `*weight*` stays a bias. Identical for torchvision / timm / open_clip.
    """
    return [p for n, p in module.named_parameters() if "weight" not in n.rsplit(".", 1)[-1]]


class SAM:
    """Two-pass sharpness-aware step around `base_optimizer` (SAM, or ASAM with `adaptive=True`).

    Args:
        params: the tensors to perturb; None: every parameter of the base optimiser's groups.
            Tensors without a gradient at `first_step` are left where they are (as upstream).
        base_optimizer: the optimiser that takes the step at w with the gradient from w + ε (a torch
            optimiser, or Lightning's wrapper of one).
        rho: radius ρ of the perturbation (>= 0; 0 makes `second_step` a plain base step).
        adaptive: ASAM's scale-invariant perturbation T = |w| + eta (False: SAM, T = 1).
        eta: ASAM's η added to |w| (0.01 in `SamsungLabs/ASAM`, 0 in the SIL / davda54 code).
        unscaled: tensors that get T = 1 even when `adaptive` (`SamsungLabs/ASAM`'s biases).
        eps: added to the norm in the denominator.

    Usage (manual optimisation)::

        loss(w).backward(); sam.first_step()          # w ← w + ε, gradients cleared
        loss2(w + ε).backward(); sam.second_step()    # w restored, base step with ∇loss2(w + ε)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | None,
        base_optimizer: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        unscaled: Iterable[Tensor] = (),
        eps: float = 1e-12,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}.")
        if eta < 0:
            raise ValueError(f"SAM: eta must be >= 0, got {eta}.")
        self.base_optimizer = base_optimizer
        if params is None:
            params = [p for g in base_optimizer.param_groups for p in g["params"]]
        self.params: list[Tensor] = list(params)
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.eps = float(eps)
        self._unscaled = {id(p) for p in unscaled}
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}  # id(p) -> (p, w before ε)
        self.last_grad_norm: Tensor | None = None  # ‖T g‖ of the last first_step (for logging)

    # -- the optimiser interface the trainer sees ------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)

    # -- the two steps ---------------------------------------------------------------------------
    def _scale(self, p: Tensor) -> Tensor | None:
        """T for `p` (None: T = 1)."""
        if not self.adaptive or id(p) in self._unscaled:
            return None
        return p.detach().abs().add(self.eta)

    @torch.no_grad()
    def perturbation(self) -> dict[int, Tensor]:
        """ε per tensor (by id) from the gradients now in `.grad`; nothing is changed."""
        live = [p for p in self.params if p.grad is not None]
        if not live:
            self.last_grad_norm = None
            return {}
        scales = [self._scale(p) for p in live]
        tg = [p.grad if t is None else t * p.grad for p, t in zip(live, scales, strict=True)]
        device = tg[0].device
        dtype = torch.promote_types(tg[0].dtype, torch.float32)  # half grads: norms in float32
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(v, dtype=dtype).to(device) for v in tg])
        )
        self.last_grad_norm = norm.detach()
        factor = self.rho / (norm + self.eps)
        out: dict[int, Tensor] = {}
        for p, t, v in zip(live, scales, tg, strict=True):
            e = v if t is None else t * v  # T² g
            out[id(p)] = (e * factor.to(e.device)).to(p.dtype)
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """w ← w + ε from the current gradients; w is kept (exactly) for `second_step`."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step (or restore).")
        eps = self.perturbation()
        for p in self.params:
            e = eps.get(id(p))
            if e is None:
                continue
            self._saved[id(p)] = (p, p.detach().clone())
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights `first_step` moved (bit for bit); a no-op without a first step."""
        for p, w in self._saved.values():
            p.copy_(w)
        self._saved.clear()

    def second_step(self, zero_grad: bool = True, **step_kwargs: Any) -> Any:
        """Restore w, then step the base optimiser with the gradients now in `.grad` (from w + ε)."""
        self.restore()
        out = self.base_optimizer.step(**step_kwargs)
        if zero_grad:
            self.zero_grad()
        return out


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` stop updating their running statistics inside the block.

    Layers in train mode still normalise with the batch's statistics (as upstream, whose
    `disable_running_stats` sets momentum 0); their running mean / variance and batch counter are
    left untouched. Done by switching `track_running_stats` off while the block runs, which in
    train mode makes the layer skip every buffer update, `num_batches_tracked` included (momentum 0
    would still count the batch). Layers in eval mode keep using their running statistics.
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True
