"""SPSA and SPSA-GC, the zeroth-order optimisers of BlackVIP.

Paper: Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning", CVPR 2023
(arXiv 2303.14773). Reproduces the optimiser of the released code (`trainers/blackvip.py`,
`trainers/vpour.py`, spec §3):

- gains a_k = a / (k + o)^alpha and c_k = c / k^gamma at the global step k = 1, 2, ...;
- q perturbations Delta_j whose entries are s * u, s = ±1, u ~ U[0.5, 1) ("segmented uniform"), or
  Rademacher ±1;
- a two-sided estimate on the same minibatch:
  g = mean_j (L(phi + c_k Delta_j) - L(phi - c_k Delta_j)) / (2 c_k) * (1 / Delta_j);
- SPSA-GC ("reformulated Nesterov"): m_1 = g_1, m_k = beta m_{k-1} + g_k,
  phi <- phi - a_k (g_k + beta m_k); plain SPSA: phi <- phi - a_k g_k.

The optimiser works on a flat parameter vector. The caller supplies the loss as a function of a stack
of 2q parameter vectors, ordered (+Delta_1, -Delta_1, +Delta_2, -Delta_2, ...), evaluated in one call
(batched), or as a function of one vector, called 2q times in that order (sequential). Both paths give
the same update for the same losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from reprolab.optim.schedules import spsa_gains

PerturbKind = Literal["segmented_uniform", "rademacher"]
LossFn = Callable[[Tensor], Tensor]

__all__ = [
    "SPSA",
    "FlatParameterOptimizer",
    "LossFn",
    "allreduce_mean",
    "as_param_list",
    "evaluate_rows",
]


def allreduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over the ranks of the default process group; ``t`` itself without DDP.

    Every rank draws the same perturbations (same generator seed), evaluates them on its own shard of
    the batch, and averages the losses, so all ranks apply the same update.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def as_param_list(params: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """Normalise a flat tensor or an iterable of tensors (e.g. ``module.parameters()``) to a list."""
    plist = [params] if isinstance(params, Tensor) else list(params)
    if not plist:
        raise ValueError(
            "The optimiser received no parameters; pass a tensor or module.parameters()."
        )
    return plist


def evaluate_rows(loss_fn: LossFn, thetas: Tensor, batched: bool) -> Tensor:
    """Evaluate ``loss_fn`` on every row of ``thetas`` (R, N) and return the losses (R,).

    Args:
        loss_fn: With ``batched``, maps (R, N) to (R,) in one call; otherwise maps (N,) to a scalar
            and is called once per row, in row order.
        thetas: Parameter vectors to evaluate.  # (R, N)
        batched: Which calling convention ``loss_fn`` follows.
    """
    if batched:
        losses = loss_fn(thetas)
        if losses.shape != (thetas.shape[0],):
            raise ValueError(
                f"A batched loss function must return one loss per parameter row, shape "
                f"({thetas.shape[0]},); got {tuple(losses.shape)}. Pass batched=False for a "
                "function of a single parameter vector."
            )
    else:
        losses = torch.stack([loss_fn(theta).reshape(()) for theta in thetas])
    return losses.detach().to(thetas.dtype)


class FlatParameterOptimizer:
    """What SPSA and RGF share: a list of tensors seen as one flat vector (`parameters_to_vector`
    order), read with `flat` and written back in place with `write`, and a dedicated generator
    that draws each step's random directions (`query`)."""

    params: list[Tensor]
    generator: torch.Generator

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        return sum(p.numel() for p in self.params)

    def flat(self) -> Tensor:
        """The current parameters as one vector."""
        with torch.no_grad():
            return parameters_to_vector(self.params).detach().clone()  # (N,)

    def write(self, vec: Tensor) -> None:
        """Overwrite the parameters with ``vec`` (N,)."""
        with torch.no_grad():
            vector_to_parameters(vec.detach().clone(), self.params)

    def query(
        self,
        loss_fn: LossFn,
        batched: bool,
        draw: Callable[[], Tensor],
        rows: Callable[[Tensor, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw this step's directions and evaluate the parameter rows built from them.

        Args:
            loss_fn, batched: As in `evaluate_rows`.
            draw: Draws the directions from `generator`.  # () -> (q, N)
            rows: Builds the rows to evaluate from the current parameters and the directions.

        Returns:
            (current parameters (N,), directions (q, N), DDP-averaged losses (R,)). If drawing or
            evaluating raises (e.g. `QueryBudgetExceeded`), the generator is rewound first, so the
            optimiser is exactly as it was before the call.
        """
        phi = self.flat()  # (N,)
        gen_state = self.generator.get_state()
        try:
            dirs = draw().to(device=phi.device, dtype=phi.dtype)
            with torch.no_grad():
                losses = evaluate_rows(loss_fn, rows(phi, dirs), batched)
        except BaseException:
            self.generator.set_state(gen_state)
            raise
        return phi, dirs, allreduce_mean(losses)


class SPSA(FlatParameterOptimizer):
    """SPSA / SPSA-GC on a flat parameter vector (spec §3).

    Example:
        >>> opt = SPSA(decoder.parameters(), a=0.01, c=0.005, alpha=0.4, gamma=0.2, momentum=0.9)
        >>> losses = opt.step(lambda thetas: per_row_loss(thetas))  # (2q,) losses, params updated

    Args:
        params: The tensors to optimise, updated in place (a 1-D tensor, or an iterable such as
            ``module.parameters()``, flattened in ``parameters_to_vector`` order).
        a: Step-size numerator of a_k = a / (k + o)^alpha.
        c: Perturbation-size numerator of c_k = c / k^gamma.
        alpha: Step-size decay exponent.
        gamma: Perturbation-size decay exponent.
        o: Stability offset of the step size.
        momentum: beta of SPSA-GC (``MOMS``); unused when ``gc`` is False.
        n_perturb: q, the number of perturbations averaged per step (``SP_AVG``).
        perturb: ``"segmented_uniform"`` (±U[0.5, 1), the official choice) or ``"rademacher"`` (±1).
        gc: SPSA-GC (True, ``OPT_TYPE: spsa-gc``) or plain SPSA (False).
        seed: Seed of the dedicated perturbation generator (use the run seed: every DDP rank then draws
            the same Delta).
    """

    def __init__(
        self,
        params: Tensor | Iterable[Tensor],
        *,
        a: float,
        c: float,
        alpha: float = 0.4,
        gamma: float = 0.1,
        o: float = 1.0,
        momentum: float = 0.9,
        n_perturb: int = 5,
        perturb: PerturbKind = "segmented_uniform",
        gc: bool = True,
        seed: int = 0,
    ) -> None:
        if perturb not in ("segmented_uniform", "rademacher"):
            raise ValueError(
                f"Unknown perturbation '{perturb}'; available: segmented_uniform, rademacher."
            )
        if n_perturb < 1:
            raise ValueError(f"n_perturb (q) must be >= 1, got {n_perturb}.")
        self.params = as_param_list(params)
        self.a, self.c, self.alpha, self.gamma, self.o = a, c, alpha, gamma, o
        self.momentum = momentum
        self.n_perturb = n_perturb
        self.perturb = perturb
        self.gc = gc
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.k = 0
        self.m: Tensor | None = None  # (N,) SPSA-GC momentum of raw gradient estimates
        self.stats: dict[str, float] = {}

    @property
    def queries_per_step(self) -> int:
        """Loss evaluations (black-box calls) per step: 2q."""
        return 2 * self.n_perturb

    def gains(self, k: int | None = None) -> tuple[float, float]:
        """(a_k, c_k) at step ``k`` (default: the next step)."""
        return spsa_gains(
            self.k + 1 if k is None else k, self.a, self.c, self.alpha, self.gamma, self.o
        )

    def sample_perturbations(self) -> Tensor:
        """Draw q perturbation vectors from the dedicated CPU generator.  # (q, N) float32

        Per vector the draw order follows the official code: magnitudes u first, then the signs.
        """
        n, g = self.num_params, self.generator
        rows = []
        for _ in range(self.n_perturb):
            if self.perturb == "segmented_uniform":
                mag = (torch.rand(n, generator=g) + 1) / 2  # U[0.5, 1)
                sign_is_neg = torch.bernoulli(torch.full((n,), 0.5), generator=g)
                rows.append(torch.where(sign_is_neg.bool(), -mag, mag))
            else:
                rows.append(torch.bernoulli(torch.full((n,), 0.5), generator=g) * 2 - 1)
        return torch.stack(rows)

    @staticmethod
    def perturbed(phi: Tensor, delta: Tensor, c_k: float) -> Tensor:
        """Rows phi + c_k Delta_1, phi - c_k Delta_1, phi + c_k Delta_2, ...  # (2q, N)"""
        step = c_k * delta  # (q, N)
        return torch.stack([phi + step, phi - step], dim=1).reshape(-1, phi.numel())

    @staticmethod
    def estimate(losses: Tensor, delta: Tensor, c_k: float) -> Tensor:
        """Two-sided SPSA gradient estimate averaged over the q perturbations.  # (N,)

        Args:
            losses: Losses in the order of :meth:`perturbed`.  # (2q,)
            delta: The perturbations.  # (q, N)
            c_k: Perturbation size of this step.
        """
        pairs = losses.reshape(-1, 2)  # (q, 2): (L+, L-)
        diff = (pairs[:, 0] - pairs[:, 1]).to(delta.dtype)  # (q,)
        return (diff[:, None] / ((2 * c_k) * delta)).mean(dim=0)

    def step(self, loss_fn: LossFn, batched: bool = True) -> Tensor:
        """One SPSA(-GC) update of the parameters.

        Args:
            loss_fn: With ``batched`` (default), a function of the stacked parameter rows (2q, N)
                returning the 2q losses (2q,), all on the same minibatch, in the order
                (+Delta_1, -Delta_1, +Delta_2, ...). Otherwise a function of one vector (N,) returning
                a scalar, called 2q times in that order.
            batched: Calling convention of ``loss_fn``.

        Returns:
            The 2q losses, averaged over DDP ranks when a process group is initialised.  # (2q,)

        If ``loss_fn`` raises (e.g. ``QueryBudgetExceeded``), the optimiser state, generator included,
        is left as it was before the call.
        """
        k = self.k + 1
        a_k, c_k = self.gains(k)
        phi, delta, losses = self.query(  # rows (2q, N): phi +/- c_k Delta_j
            loss_fn, batched, self.sample_perturbations, lambda p, d: self.perturbed(p, d, c_k)
        )
        ghat = self.estimate(losses, delta, c_k)  # (N,)
        if self.gc:
            self.m = ghat.clone() if (k == 1 or self.m is None) else self.momentum * self.m + ghat
            direction = ghat + self.momentum * self.m
        else:
            direction = ghat
        self.write(phi - a_k * direction)
        self.k = k
        self.stats = {
            "loss": float(losses[-2:].mean()),  # official logging: the last (+, -) pair
            "loss_mean": float(losses.mean()),
            "grad_norm": float(ghat.norm()),
            "step_norm": float(a_k * direction.norm()),
            "a_k": a_k,
            "c_k": c_k,
        }
        return losses

    def state_dict(self) -> dict[str, Any]:
        """Step counter, momentum and generator state (everything a resume needs)."""
        return {
            "k": self.k,
            "m": None if self.m is None else self.m.detach().cpu().clone(),
            "generator": self.generator.get_state(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.k = int(state["k"])
        m = state["m"]
        ref = self.params[0]
        self.m = None if m is None else m.to(device=ref.device, dtype=ref.dtype).clone()
        self.generator.set_state(state["generator"])
