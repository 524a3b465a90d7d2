"""Randomised gradient-free (RGF) estimator of BAR, the black-box reprogramming baseline of BlackVIP.

BAR: Tsai et al., "Transfer Learning without Knowing: Reprogramming Black-box Machine Learning Models
with Scarce Data and Limited Resources", ICML 2020 (arXiv 2007.08714), as re-implemented in the
BlackVIP code base (Oh et al., CVPR 2023, arXiv 2303.14773; `trainers/reprogramming.py`, spec §4.2):

- L_0 = loss(W); for j = 1..q: u_j ~ N(0, sigma^2 I), u_j <- u_j / ||u_j||, L_j = loss(W + beta u_j);
- g = sum_j (d / q) (L_j - L_0) / beta * u_j with d the number of parameters (q + 1 queries per step);
- W <- W - eta_t g with eta_t = (eta0 - eta_min)(1 - min(t, T_d)/T_d)^0.9 + eta_min,
  T_d = 0.9 * total steps, t = 1, 2, ...; no momentum.

Rows passed to the loss are ordered (W, W + beta u_1, ..., W + beta u_q).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from reprolab.optim.schedules import poly_decay_lr
from reprolab.optim.spsa import FlatParameterOptimizer, LossFn, as_param_list

__all__ = ["RGF"]


class RGF(FlatParameterOptimizer):
    """BAR's one-sided randomised gradient-free optimiser on a flat parameter vector.

    Args:
        params: Tensors optimised in place (a 1-D tensor or an iterable such as
            ``module.parameters()``).
        lr0: Initial learning rate eta0 (``TRAINER.BAR.LRS[0]``).
        lr_min: Final learning rate eta_min (``TRAINER.BAR.LRS[1]``).
        total_steps: Steps of the whole run; the rate decays over ``decay_frac`` of them.
        n_dirs: q, random directions per step (``SP_AVG``).
        smoothing: beta, the step along each direction (``SMOOTH``).
        sigma: Standard deviation of the raw Gaussian directions (``SIMGA``; irrelevant after the
            normalisation, kept for the draw).
        decay_frac: Fraction of ``total_steps`` over which the rate decays (0.9).
        power: Exponent of the polynomial decay (0.9).
        seed: Seed of the dedicated direction generator (the run seed).
    """

    def __init__(
        self,
        params: Tensor | Iterable[Tensor],
        *,
        lr0: float,
        lr_min: float,
        total_steps: int,
        n_dirs: int = 5,
        smoothing: float = 0.01,
        sigma: float = 1.0,
        decay_frac: float = 0.9,
        power: float = 0.9,
        seed: int = 0,
    ) -> None:
        if n_dirs < 1:
            raise ValueError(f"n_dirs (q) must be >= 1, got {n_dirs}.")
        self.params = as_param_list(params)
        self.lr0, self.lr_min, self.total_steps = lr0, lr_min, total_steps
        self.n_dirs, self.smoothing, self.sigma = n_dirs, smoothing, sigma
        self.decay_frac, self.power = decay_frac, power
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.t = 0
        self.stats: dict[str, float] = {}

    @property
    def queries_per_step(self) -> int:
        """Loss evaluations (black-box calls) per step: q + 1."""
        return self.n_dirs + 1

    def lr(self, t: int | None = None) -> float:
        """eta_t at step ``t`` (default: the next step)."""
        t = self.t + 1 if t is None else t
        return poly_decay_lr(
            t, self.total_steps, self.lr0, self.lr_min, self.power, self.decay_frac
        )

    def sample_directions(self) -> Tensor:
        """q Gaussian directions normalised to unit L2 norm, from the dedicated generator.  # (q, d)"""
        rows = []
        for _ in range(self.n_dirs):
            u = torch.randn(self.num_params, generator=self.generator) * self.sigma
            rows.append(u / torch.norm(u, p=2))
        return torch.stack(rows)

    def estimate(self, losses: Tensor, dirs: Tensor) -> Tensor:
        """RGF estimate sum_j (d/q)(L_j - L_0)/beta u_j.  # (d,)

        Args:
            losses: (L_0, L_1, ..., L_q).  # (q + 1,)
            dirs: Unit directions u_j.  # (q, d)
        """
        d, q, beta = self.num_params, self.n_dirs, self.smoothing
        ghat = torch.zeros_like(dirs[0])
        for j in range(q):  # accumulated in order, as in the official loop
            ghat = ghat + (d / q) * dirs[j] * (losses[j + 1] - losses[0]) / beta
        return ghat

    def step(self, loss_fn: LossFn, batched: bool = True) -> Tensor:
        """One RGF update of the parameters.

        Args:
            loss_fn: With ``batched``, maps the rows (W, W + beta u_1, ..., W + beta u_q), shape
                (q + 1, d), to their losses (q + 1,) in one call; otherwise maps one row (d,) to a
                scalar and is called q + 1 times in that order.
            batched: Calling convention of ``loss_fn``.

        Returns:
            The q + 1 losses (DDP-averaged); ``losses[0]`` is the loss at the current parameters.

        If ``loss_fn`` raises, the optimiser state (generator included) is unchanged.
        """
        t = self.t + 1
        eta = self.lr(t)
        w, dirs, losses = self.query(  # rows (q + 1, d): W, W + beta u_j
            loss_fn,
            batched,
            self.sample_directions,
            lambda w, u: torch.cat([w[None], w[None] + self.smoothing * u]),
        )
        ghat = self.estimate(losses, dirs)
        self.write(w - eta * ghat)
        self.t = t
        self.stats = {
            "loss": float(losses[0]),
            "grad_norm": float(ghat.norm()),
            "lr": eta,
        }
        return losses

    def state_dict(self) -> dict[str, Any]:
        """Step counter and generator state."""
        return {"t": self.t, "generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.t = int(state["t"])
        self.generator.set_state(state["generator"])
