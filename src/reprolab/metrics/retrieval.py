"""Image-text retrieval and embedding geometry (robust_finetuning.md §4.2-4.5).

Retrieval. `similarity` is (N_images, N_texts). Each image may have several captions (Flickr30k and
COCO: 5): `text_to_image[j]` is the image of caption j. Image->text recall@K counts an image as a
hit when any of its captions is in its top K; text->image counts a caption when its image is in its
top K (the protocol of CLIP, Radford et al. 2021). Ranks are strict (pitfall P10): the rank of a
positive is the number of candidates that score strictly higher, so ties never push it down and the
result does not depend on how `topk` orders equal scores.

Geometry (Wang & Isola, ICML 2020; the m2-mix paper's analysis), on L2-normalised embeddings:
- `uniformity(x)` = log mean_{i<j} exp(-t ||x_i - x_j||^2), t = 2 (lower = more uniform). The m2-mix
  paper means the multimodal set [U; V]; its release passes [U; U] (pitfall P8), see `code_compat`.
- `alignment(u, v)` = mean_i ||u_i - v_i||^2 (alpha = 2; lower = better aligned).
- `relative_alignment(v, u)` = mean_i [||v_i - u_i||^2 - min_{j != i} ||v_i - u_j||^2], the release's
  logged "alignment" (text as anchor).
- `modality_gap(u, v)` = ||mean(u) - mean(v)||, the distance between the two modalities' centroids
  (Liang et al., NeurIPS 2022), and `cosine_diagnostics`: mean |cos| of image-image, text-text,
  positive and negative image-text pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error


def _ranks(similarity: Tensor, text_to_image: Tensor) -> tuple[Tensor, Tensor]:
    """(image->text rank per image, text->image rank per caption), strict, 0 = top."""
    n_img, n_txt = similarity.shape
    s = similarity.float()
    match = text_to_image.unsqueeze(0) == torch.arange(n_img, device=s.device)[:, None]  # (I, T)
    best_pos = s.masked_fill(~match, float("-inf")).max(1).values  # (I,)
    i2t = (s.masked_fill(match, float("-inf")) > best_pos[:, None]).sum(1)
    pos = s.gather(0, text_to_image[None, :].long()).squeeze(0)  # (T,) score of the own image
    t2i = (s > pos[None, :]).sum(0)
    return i2t, t2i


def recall_at_k(
    similarity: Tensor, text_to_image: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """`i2t_r@K` and `t2i_r@K` (percent) for every K in `ks`, with `rsum` (their sum) and `r1_sum`
    (i2t R@1 + t2i R@1, the m2-mix release's model-selection number)."""
    n_img, n_txt = similarity.shape
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must be ({n_txt},), got {tuple(text_to_image.shape)}")
    orphans = set(range(n_img)) - set(text_to_image.tolist())
    if orphans:
        raise ValueError(f"images without a caption: {sorted(orphans)[:5]} ({len(orphans)})")
    i2t, t2i = _ranks(similarity, text_to_image.to(similarity.device))
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = 100.0 * float((i2t < k).float().mean())
        out[f"t2i_r@{k}"] = 100.0 * float((t2i < k).float().mean())
    out["rsum"] = sum(out[f"{d}_r@{k}"] for d in ("i2t", "t2i") for k in ks)
    if 1 in ks:
        out["r1_sum"] = out["i2t_r@1"] + out["t2i_r@1"]
    return out


def uniformity(x: Tensor, t: float = 2.0) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||^2) over the rows of `x` (lower = more uniform)."""
    d2 = torch.pdist(x.double(), p=2).pow(2)
    return float(torch.logsumexp(-t * d2, 0) - torch.log(torch.tensor(float(d2.numel()))))


def alignment(u: Tensor, v: Tensor, alpha: float = 2.0) -> float:
    """mean_i ||u_i - v_i||^alpha (lower = positive pairs closer)."""
    return float((u.double() - v.double()).norm(dim=1).pow(alpha).mean())


def relative_alignment(anchor: Tensor, other: Tensor, alpha: float = 2.0) -> float:
    """mean_i [||a_i - o_i||^alpha - min_{j != i} ||a_i - o_j||^alpha] (the release's logged value)."""
    a, o = anchor.double(), other.double()
    d = torch.cdist(a, o).pow(alpha)
    pos = d.diagonal().clone()
    d.fill_diagonal_(float("inf"))
    return float((pos - d.min(1).values).mean())


def modality_gap(u: Tensor, v: Tensor) -> float:
    """||mean(u) - mean(v)||: distance between the image and text centroids."""
    return float((u.double().mean(0) - v.double().mean(0)).norm())


def cosine_diagnostics(u: Tensor, v: Tensor) -> dict[str, float]:
    """Mean |cos| of image-image, text-text (off-diagonal), positive and negative image-text pairs."""
    u, v = u.double(), v.double()
    n = u.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=u.device)
    uv = (u @ v.t()).abs()
    return {
        "cos_image": float((u @ u.t()).abs()[off].mean()),
        "cos_text": float((v @ v.t()).abs()[off].mean()),
        "cos_pos": float(uv.diagonal().mean()),
        "cos_neg": float(uv[off].mean()),
    }


def retrieval_ece(similarity: Tensor, scale: float, n_bins: int = 10) -> dict[str, float]:
    """ECE of retrieval as classification (robust_finetuning.md §4.5): each image->text row, a softmax
    over the N captions of `scale * similarity`, labelled with its own caption (and the same for the
    text->image columns); max-probability confidence, `n_bins` equal-width bins, weights n_b / N.
    One caption per image (a square `similarity` whose diagonal holds the pairs). Fractions.

    DEVIATION: the older m2-mix routine weighted bins by n_b / 10 and applied a second temperature;
    the standard ECE is computed here (the spec's choice), with the model's own scale.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(
            f"retrieval ECE needs one caption per image (N x N), got {similarity.shape}"
        )
    target = torch.arange(n, device=similarity.device)
    logits = scale * similarity.float()
    out = {}
    for key, z in (("ece_i2t", logits), ("ece_t2i", logits.t())):
        out[key] = float(
            multiclass_calibration_error(
                z.softmax(-1), target, num_classes=n, n_bins=n_bins, norm="l1"
            )
        )
    return out


def embedding_geometry(u: Tensor, v: Tensor, code_compat: bool = False) -> dict[str, float]:
    """Uniformity, alignment, relative alignment, modality gap and cosine diagnostics of unit image
    embeddings `u` and their captions' embeddings `v` (one caption per image, row-aligned).

    `uniformity` is over [U; V] (the paper's multimodal uniformity); `uniformity_code` over [U; U]
    (the release's call, pitfall P8) when `code_compat`.
    """
    out = {
        "uniformity": uniformity(torch.cat([u, v])),
        "alignment": alignment(u, v),
        "rel_alignment": relative_alignment(v, u),
        "modality_gap": modality_gap(u, v),
        **cosine_diagnostics(u, v),
    }
    if code_compat:
        out["uniformity_code"] = uniformity(torch.cat([u, u]))
    return out
