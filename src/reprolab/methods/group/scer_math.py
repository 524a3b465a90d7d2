"""SCER's embedding regulariser as pure tensor functions (no Lightning, no module state).

SCER: "Spurious Correlation-Aware Embedding Regularization for Worst-Group Robustness" (ICLR 2026,
arXiv 2511.04401; official code `MLAI-Yonsei/SCER`, class `SCER` in `scer/learning/algorithms.py`).
Spec: robustness_ood_prompting.md §1.2, steps 1 and 3-8 (step 2, the GroupDRO term, and step 9, the
sum, belong to the method that calls `scer_embedding_loss`).

Notation (spec §1.2): h (B, d) the featurizer output, y in {0, 1} the label, a in {0, 1} the
spurious attribute, group g = y·|A| + a with |A| = 2, so G0 = (0, 0), G1 = (0, 1), G2 = (1, 0),
G3 = (1, 1). Only binary y and a enter the regulariser (upstream looks at groups 0-3 only); samples of other
labels (MultiNLI's third class) count in Σ and nowhere else, as upstream.

    Σ  = 0.1 · C / (‖C‖_F + 1e-6) + I                 C: unbiased batch covariance of h
    μ_g = mean of h over the batch samples of group g
    Δ0 = ½(|μ1 − μ0| + |μ3 − μ2|),  Δ = ½(|μ2 − μ0| + |μ3 − μ1|),  each / (‖·‖₂ + 1e-6)
    a0 = ½ [P(a=1|y=1) P(y=1) + P(a=0|y=0) P(y=0)]   from the batch's group counts
    β  = Σ⁻¹Δ − Σ⁻¹Δ0 · a0 ΔᵀΣ⁻¹Δ0 / (1 + a0 Δ0ᵀΣ⁻¹Δ0)  = (Σ + a0 Δ0Δ0ᵀ)⁻¹ Δ  (Sherman-Morrison)
    s  = βᵀΔ0 / ‖β‖_Σ,  c = βᵀΔ / ‖β‖_Σ,  ‖v‖_Σ = sqrt(vᵀΣv)
    L_emb = λ_sp · |s| − λ_core · c
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_ATTRIBUTES = 2  # |A|: the regulariser is defined for a binary spurious attribute
SCER_GROUPS = 4  # G0..G3: binary y times binary a
BETA_SOURCES = ("closed_form", "head")


def regularised_covariance(h: Tensor) -> Tensor:
    """Σ = 0.1 · C / (‖C‖_F + 1e-6) + I, C the unbiased covariance of the rows of `h`. (d, d)

    Args:
        h: embeddings (B, d), B >= 2.
    """
    if h.dim() != 2 or h.shape[0] < 2:
        raise ValueError(
            f"regularised_covariance needs embeddings (B >= 2, d), got {tuple(h.shape)}"
        )
    dev = h - h.mean(dim=0, keepdim=True)  # (B, d)
    cov = dev.T @ dev / (h.shape[0] - 1)  # (d, d)
    eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    return 0.1 * cov / (torch.linalg.matrix_norm(cov) + 1e-6) + eye


def group_means(h: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group mean embeddings and counts, from one forward pass.

    # DEVIATION: upstream re-runs the featurizer on each group's subset of the batch; this averages
    # the already-computed `h` under a group mask instead (spec §1.2 step 3 allows it). The two are
    # identical except for BatchNorm batch statistics (and dropout masks) in train mode.

    Args:
        h: embeddings (B, d).
        groups: group index per row (B,), long; rows outside [0, num_groups) are ignored.
        num_groups: G.

    Returns:
        `(means (G, d), counts (G,) long)`; an absent group's mean is zeros (count 0).
    """
    groups = groups.to(h.device).long()
    onehot = torch.nn.functional.one_hot(groups.clamp(0, num_groups - 1), num_groups)  # (B, G)
    valid = (groups >= 0) & (groups < num_groups)
    onehot = (onehot * valid[:, None]).to(h.dtype)
    counts = onehot.sum(dim=0)  # (G,)
    means = onehot.T @ h / counts.clamp(min=1)[:, None]  # (G, d)
    return means, counts.round().long()


def _unit(v: Tensor) -> Tensor:
    return v / (torch.linalg.vector_norm(v) + 1e-6)


def directions(means: Tensor) -> tuple[Tensor, Tensor]:
    """(Δ0, Δ): the spurious and core directions from the four group means G0..G3. (d,), (d,)

    Δ0 averages the attribute difference within each class, Δ the class difference within each
    attribute, element-wise in absolute value; each is L2-normalised with 1e-6 in the denominator.

    Args:
        means: group means (4, d) in the order G0 = (y0, a0), G1 = (y0, a1), G2 = (y1, a0),
            G3 = (y1, a1).
    """
    if means.shape[0] != SCER_GROUPS:
        raise ValueError(f"directions needs the 4 group means G0..G3, got {means.shape[0]} rows")
    m0, m1, m2, m3 = means
    delta0 = 0.5 * ((m1 - m0).abs() + (m3 - m2).abs())  # spurious: a varies, y fixed
    delta = 0.5 * ((m2 - m0).abs() + (m3 - m1).abs())  # core: y varies, a fixed
    return _unit(delta0), _unit(delta)


def _a0_from_counts(counts: Tensor) -> Tensor:
    """a0 from the counts of G0..G3 (4,), as upstream's `compute_a0` (1e-12 in the totals)."""
    n0, n1, n2, n3 = counts.to(torch.float64)
    total = n0 + n1 + n2 + n3
    y1, y0 = n2 + n3, n0 + n1
    p_y1, p_y0 = y1 / (total + 1e-12), y0 / (total + 1e-12)
    # P(a=1 | y=1) and P(a=0 | y=0): both labels are present whenever the four groups are.
    return 0.5 * (n3 / y1 * p_y1 + n0 / y0 * p_y0)


def spurious_strength(y: Tensor, a: Tensor) -> Tensor:
    """a0 = ½ [P(a=1|y=1)·P(y=1) + P(a=0|y=0)·P(y=0)] from the batch's group counts. 0-dim float64

    Rows with y outside {0, 1} are ignored (upstream counts groups 0-3 only). NaN when a label
    is missing from the batch (upstream divides by its zero count); the loss never asks then.
    """
    g = y.long() * NUM_ATTRIBUTES + a.long()
    keep = (y >= 0) & (y < 2)
    counts = torch.bincount(g[keep], minlength=SCER_GROUPS)[:SCER_GROUPS]
    return _a0_from_counts(counts)


def reference_direction(sigma: Tensor, delta: Tensor, delta0: Tensor, a0: Tensor | float) -> Tensor:
    """β = Σ⁻¹Δ − Σ⁻¹Δ0 · (a0 ΔᵀΣ⁻¹Δ0) / (1 + a0 Δ0ᵀΣ⁻¹Δ0) = (Σ + a0 Δ0Δ0ᵀ)⁻¹Δ. (d,)

    The closed-form classifier direction of SCER (not the learned head). One linear solve for both
    right-hand sides; upstream forms Σ⁻¹ with `torch.linalg.inv` (same value, less stable).
    """
    rhs = torch.stack([delta, delta0], dim=1)  # (d, 2)
    sol = torch.linalg.solve(sigma, rhs)  # (d, 2): Σ⁻¹Δ, Σ⁻¹Δ0
    s_delta, s_delta0 = sol[:, 0], sol[:, 1]
    a0 = torch.as_tensor(a0, dtype=sigma.dtype, device=sigma.device)
    num = a0 * (delta @ s_delta0)
    den = 1.0 + a0 * (delta0 @ s_delta0)
    return s_delta - s_delta0 * (num / den)


def alignments(beta: Tensor, delta: Tensor, delta0: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(s, c): spurious and core alignment of β, each 0-dim.

    s = ‖Δ0‖_Σ · βᵀΔ0 / (‖Δ0‖_Σ ‖β‖_Σ) = βᵀΔ0 / ‖β‖_Σ and c = βᵀΔ / ‖β‖_Σ (spec §1.2 step 7).
    Upstream multiplies and divides by ‖Δ0‖_Σ (‖Δ‖_Σ); the cancelled form is used here: the same
    value, and defined (0, not 0/0) when a direction vanishes.
    """
    beta_norm = torch.sqrt(beta @ sigma @ beta)
    return (beta @ delta0) / beta_norm, (beta @ delta) / beta_norm


def head_direction(head_weight: Tensor) -> Tensor:
    """β from a linear head: the logit-difference direction w_1 − w_0 of a 2-class head (2, d),
    or a vector (d,) as given. (d,)"""
    if head_weight.dim() == 1:
        return head_weight
    if head_weight.dim() == 2 and head_weight.shape[0] == 2:
        return head_weight[1] - head_weight[0]
    raise ValueError(
        "beta_source=head needs a binary head weight (2, d) or a direction (d,), got shape "
        f"{tuple(head_weight.shape)}; SCER's regulariser is defined for binary labels."
    )


def scer_embedding_loss(
    h: Tensor,
    y: Tensor,
    a: Tensor,
    lambda_spurious: float,
    lambda_core: float,
    beta_source: str = "closed_form",
    head_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]] | None:
    """L_emb = λ_sp · |s| − λ_core · c on one batch (spec §1.2 steps 1, 3-8).

    Gradients flow through `h` into Σ, Δ, Δ0 and β (and into `head_weight` with `beta_source=head`).
    Half-precision embeddings are computed in float32; float64 stays float64.

    Args:
        h: featurizer output (B, d).
        y: labels (B,); only 0 and 1 define groups (other labels enter Σ only, as upstream).
        a: spurious attribute (B,) in {0, 1}.
        lambda_spurious: λ_sp, weight of |s|.
        lambda_core: λ_core, weight of c (rewarded: subtracted).
        beta_source: `closed_form` (upstream: β from batch statistics) or `head` (ablation: β is
            the learned head's direction, `head_direction(head_weight)`).
        head_weight: the linear head's weight (2, d) (or a direction (d,)), for `beta_source=head`.

    Returns:
        `(L_emb (0-dim), {"s", "c", "a0"} detached 0-dim tensors)`, or None when one of G0..G3
        is absent from the batch: upstream then reuses the previous step's L_emb, detached, so the
        step gets no gradient from it; the caller keeps that value.
    """
    if beta_source not in BETA_SOURCES:
        raise ValueError(f"beta_source must be one of {list(BETA_SOURCES)}, got {beta_source!r}.")
    if beta_source == "head" and head_weight is None:
        raise ValueError("beta_source=head needs head_weight (the linear head's weight).")
    if h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    y, a = y.to(h.device).long(), a.to(h.device).long()
    binary = (y >= 0) & (y < 2)
    groups = torch.where(binary, y * NUM_ATTRIBUTES + a, torch.full_like(y, -1))
    bad_a = ((a < 0) | (a >= NUM_ATTRIBUTES)).sum()
    means, counts = group_means(h, groups, SCER_GROUPS)
    check = torch.cat([counts, bad_a[None]]).tolist()  # one host sync for both decisions
    if check[-1]:
        raise ValueError("SCER's regulariser needs a binary spurious attribute a in {0, 1}.")
    if min(check[:SCER_GROUPS]) == 0:
        return None
    sigma = regularised_covariance(h)
    delta0, delta = directions(means)
    a0 = _a0_from_counts(counts).to(h.dtype)
    if beta_source == "closed_form":
        beta = reference_direction(sigma, delta, delta0, a0)
    else:
        beta = head_direction(head_weight.to(h.dtype))
    s, c = alignments(beta, delta, delta0, sigma)
    loss = lambda_spurious * s.abs() - lambda_core * c
    return loss, {"s": s.detach(), "c": c.detach(), "a0": a0.detach()}
