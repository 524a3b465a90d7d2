"""Step-size schedules: the zeroth-order optimisers' gains and the robust fine-tuning `cosine_lr`.

Reproduces the gain sequences of BlackVIP (Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust
Transfer Learning", CVPR 2023, arXiv 2303.14773) as released in `changdaeoh/BlackVIP`:

- SPSA / SPSA-GC gains (spec §3): a_k = a / (k + o)^alpha, c_k = c / k^gamma, k = 1, 2, ...
- BAR's polynomial decay (spec §4.2): eta_t = (eta0 - eta_min) (1 - min(t, T_d)/T_d)^0.9 + eta_min,
  T_d = 0.9 * total steps, t = 1, 2, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def spsa_gains(
    k: int, a: float, c: float, alpha: float, gamma: float, o: float = 1.0
) -> tuple[float, float]:
    """SPSA step size a_k and perturbation size c_k at global step ``k`` (spec §3).

    Args:
        k: Global step, counted from 1 and never reset across epochs.
        a: Step-size numerator.
        c: Perturbation-size numerator.
        alpha: Step-size decay exponent.
        gamma: Perturbation-size decay exponent.
        o: Stability offset added to k in the step size.

    Returns:
        ``(a_k, c_k)``.
    """
    if k < 1:
        raise ValueError(f"SPSA step k must start at 1, got k={k}.")
    return a / (k + o) ** alpha, c / k**gamma


def poly_decay_lr(
    t: int,
    total_steps: int,
    lr0: float,
    lr_min: float,
    power: float = 0.9,
    decay_frac: float = 0.9,
) -> float:
    """BAR's polynomial learning-rate decay (spec §4.2).

    Args:
        t: Step, counted from 1 (the official trainer increments its counter before the update).
        total_steps: Number of optimisation steps of the whole run (batches per epoch × epochs).
        lr0: Initial learning rate eta0.
        lr_min: Final learning rate eta_min, reached at ``t = decay_frac * total_steps``.
        power: Decay exponent (0.9 in BAR).
        decay_frac: Fraction of the steps over which the rate decays (0.9 in BAR).

    Returns:
        The learning rate eta_t.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    decay_steps = decay_frac * total_steps
    t_eff = min(float(t), decay_steps)
    return (lr0 - lr_min) * (1.0 - t_eff / decay_steps) ** power + lr_min


def cosine_lr(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr: float = 0.0,
    warmup_frac: float | None = None,
) -> LambdaLR:
    """FLYP / WiSE-FT / CaRot's `cosine_lr`, stepped every optimiser step (robust_finetuning.md §1.5).

    lr(s) = base · (s + 1) / W for s < W, then ½ (1 + cos(π (s − W) / (T − W))) · base + min_lr.
    As in the released code `min_lr` is added (the peak is base + min_lr; 0 in every recipe). A
    partial factory in `configs/method/{ft,flyp,carot}.yaml`; `total_steps: null` becomes the run's
    length (`reprolab.methods.base.Method.configure_optimizers`). `warmup_frac` (the m2-mix release's
    `--warm_r`, 0.1) sets W = int(warmup_frac · T) instead of `warmup_steps`.
    """
    if warmup_frac is not None:
        warmup_steps = int(float(warmup_frac) * total_steps)
    if not 0 <= warmup_steps < total_steps:
        from reprolab.errors import ConfigValueError

        raise ConfigValueError(
            f"cosine_lr needs 0 <= warmup_steps < total_steps (got {warmup_steps}, {total_steps}); "
            "lower method.scheduler.warmup_steps or lengthen the run."
        )
    bases = [g["lr"] for g in optimizer.param_groups]

    def factor(i: int) -> Callable[[int], float]:
        base = bases[i]

        def f(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            e = step - warmup_steps
            cos = 0.5 * (1 + math.cos(math.pi * e / (total_steps - warmup_steps)))
            return cos + (min_lr / base if base else 0.0)

        return f

    return LambdaLR(optimizer, [factor(i) for i in range(len(bases))])
