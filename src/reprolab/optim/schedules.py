"""Step-size schedules: zeroth-order gains, the robust fine-tuning `cosine_lr`, Dassl's cosine.

Reproduces the gain sequences of BlackVIP (Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust
Transfer Learning", CVPR 2023, arXiv 2303.14773) as released in `changdaeoh/BlackVIP`:

- SPSA / SPSA-GC gains (spec §3): a_k = a / (k + o)^alpha, c_k = c / k^gamma, k = 1, 2, ...
- BAR's polynomial decay (spec §4.2): eta_t = (eta0 - eta_min) (1 - min(t, T_d)/T_d)^0.9 + eta_min,
  T_d = 0.9 * total steps, t = 1, 2, ...

`dassl_cosine` is the per-epoch schedule of the CoOp family's Dassl trainers (CoOp, Zhou et al.,
IJCV 2022, arXiv 2109.01134; prompting_posthoc.md A1.2), expressed per optimiser step.
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


def dassl_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
) -> LambdaLR:
    """Dassl's per-epoch cosine schedule with constant warm-up (CoOp / CoCoOp / KgCoOp), per step.

    Dassl (`dassl/optim/lr_scheduler.py`, `OPTIM.WARMUP_RECOUNT = True`) steps its scheduler once
    per epoch: epochs e < W train at the constant `warmup_lr`; epoch e >= W trains at
    base · ½ (1 + cos(π (e − W) / E)), E = `max_epoch` (the warm-up epochs count in E, and the
    cosine restarts its count after them, so the last epoch's rate is not 0; spec A1.2).
    Here the rate of optimiser step s is that of its epoch e = s // `steps_per_epoch`, so a
    `LambdaLR` stepped every optimiser step gives the same rate per epoch. A partial factory in
    `configs/method/{coop,cocoop,kgcoop}.yaml`: `total_steps: null` and `steps_per_epoch: null` are
    filled with the run's length and its batches per epoch (`Method.configure_optimizers`).

    Args:
        optimizer: the optimiser; each group's `lr` is its base rate.
        total_steps: optimiser steps of the whole run (E = total_steps // steps_per_epoch).
        steps_per_epoch: optimiser steps per epoch.
        warmup_epochs: W, epochs at the constant warm-up rate (Dassl `WARMUP_EPOCH`, 1).
        warmup_lr: the warm-up rate (Dassl `WARMUP_CONS_LR`, 1e-5), the same for every group.
    """
    if total_steps is None or steps_per_epoch is None:
        from reprolab.errors import ConfigValueError

        raise ConfigValueError(
            f"dassl_cosine got total_steps={total_steps}, steps_per_epoch={steps_per_epoch}: a run "
            "fills them when a method's configure_optimizers builds the schedule; outside a run "
            "pass both."
        )
    if steps_per_epoch < 1 or total_steps < 1 or warmup_epochs < 0:
        from reprolab.errors import ConfigValueError

        raise ConfigValueError(
            f"dassl_cosine needs total_steps >= 1, steps_per_epoch >= 1 and warmup_epochs >= 0 "
            f"(got {total_steps}, {steps_per_epoch}, {warmup_epochs}); leave "
            "method.scheduler.total_steps and steps_per_epoch null so the run fills them."
        )
    # A run shorter than one epoch (smoke runs with trainer.max_steps) still needs E >= 1.
    max_epoch = max(1, total_steps // steps_per_epoch)
    bases = [g["lr"] for g in optimizer.param_groups]

    def factor(i: int) -> Callable[[int], float]:
        base = bases[i]

        def f(step: int) -> float:
            e = step // steps_per_epoch
            if e < warmup_epochs:
                return warmup_lr / base if base else 0.0
            return 0.5 * (1 + math.cos(math.pi * (e - warmup_epochs) / max_epoch))

        return f

    return LambdaLR(optimizer, [factor(i) for i in range(len(bases))])
