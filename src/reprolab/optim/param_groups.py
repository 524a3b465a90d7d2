"""Weight-decay parameter groups, and SubpopBench's text optimisation (AdamW, linear decay to 0).

SubpopBench (`YyzHarry/SubpopBench` @ 4d3dbbe; spec robustness_ood_prompting.md §1.3) trains its
BERT featurizer and linear head on CivilComments / MultiNLI with:

- `get_bert_optim` (`subpopbench/learning/optimizers.py`): AdamW, eps 1e-8, two parameter groups.
  The names it filters (`bias`, `LayerNorm.weight`) are meant to be the *no-decay* group (the
  Hugging Face `run_glue` convention), but the lists are filled the other way round: the tensors
  whose names match get `weight_decay`, every other tensor (weight matrices, embeddings) gets 0.
- `get_scheduler("linear", num_warmup_steps=0, num_training_steps=steps)`, stepped after every
  update (`subpopbench/learning/algorithms.py`, `ERM._init_model` / `update`): the rate falls
  linearly from `lr` to 0 over the run's steps.
- the gradient norm clipped at 1.0 (`clip_grad_norm_(network.parameters(), 1.0)`), which here is
  the method's `grad_clip` (`FineTuningMethod.configure_gradient_clipping`).

Optimizer factories receive the trainable tensors only, without names (`Method.configure_optimizers`),
so the groups are split by tensor rank. For BERT plus a linear head the 1-D tensors are exactly the
tensors SubpopBench's name filter matches (every bias, every LayerNorm weight and bias; the
embeddings and weight matrices are 2-D), so `decay: vectors` reproduces `get_bert_optim` as released
and `decay: matrices` is what it intended (1-D tensors, as timm's and Hugging Face's filters, get 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from reprolab.errors import ConfigValueError

#: Which tensors get `weight_decay`: `all` of them; `matrices` (rank >= 2: no decay on biases and
#: norm weights); `vectors` (rank <= 1 only: SubpopBench's `get_bert_optim`, its groups swapped).
DECAY_RULES: tuple[str, ...] = ("all", "matrices", "vectors")


def decay_groups(
    params: Iterable[Tensor], weight_decay: float, decay: str = "matrices"
) -> list[dict[str, Any]]:
    """Parameter groups `[{params, weight_decay}, ...]` by tensor rank (empty groups left out).

    Args:
        params: the tensors to optimise.
        weight_decay: the decay of the decayed group (the other group gets 0).
        decay: a rule of `DECAY_RULES`.
    """
    if decay not in DECAY_RULES:
        raise ConfigValueError(
            f"optimizer decay must be one of {list(DECAY_RULES)}, got {decay!r}."
        )
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        raise TypeError("decay_groups takes tensors, not parameter groups.")
    if decay == "all":
        return [{"params": params, "weight_decay": float(weight_decay)}]
    vectors = [p for p in params if p.dim() <= 1]
    matrices = [p for p in params if p.dim() > 1]
    decayed, kept = (matrices, vectors) if decay == "matrices" else (vectors, matrices)
    groups = [
        {"params": decayed, "weight_decay": float(weight_decay)},
        {"params": kept, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adamw(
    params: Iterable[Tensor],
    lr: float,
    weight_decay: float = 0.0,
    decay: str = "matrices",
    eps: float = 1e-8,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `decay_groups(params, weight_decay, decay)`.

    DEVIATION: SubpopBench uses `transformers.AdamW` (removed from transformers 5), which adds `eps`
    before the bias correction (an effective eps of eps / sqrt(1 - beta2^t): 3e-7 at step 1 for
    eps 1e-8, eps again after a few thousand steps) and decays the weights after the Adam update
    rather than before it (a difference of order lr^2 * weight_decay per step).
    """
    b1, b2 = (float(b) for b in betas)
    return torch.optim.AdamW(
        decay_groups(params, weight_decay, decay), lr=float(lr), eps=float(eps), betas=(b1, b2)
    )


def linear_lr(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None
) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then linear decay to 0 at `total_steps`, stepped per step.

    `transformers.get_linear_schedule_with_warmup` (SubpopBench's `get_scheduler("linear")`): the
    rate of update s (0-based) is lr · s / W during warmup, then lr · (T - s) / (T - W). In a method
    config `total_steps: null` becomes the run's length (`Method.configure_optimizers`:
    `trainer.estimated_stepping_batches`, i.e. `trainer.max_steps` in a step-budget run).
    """
    from transformers import get_linear_schedule_with_warmup

    if total_steps is None:
        raise ConfigValueError(
            "linear_lr needs total_steps (a method config's `total_steps: null` is filled with the "
            "run's length by the method; called directly, pass it)."
        )
    if not 0 <= int(warmup_steps) < int(total_steps):
        raise ConfigValueError(
            f"linear_lr needs 0 <= warmup_steps < total_steps (got {warmup_steps}, {total_steps}); "
            "lower method.scheduler.warmup_steps or lengthen the run (trainer.max_steps)."
        )
    return get_linear_schedule_with_warmup(optimizer, int(warmup_steps), int(total_steps))
