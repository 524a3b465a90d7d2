"""SIMAT: text-driven image transformation by embedding arithmetic (Couairon et al. 2021,
facebookresearch/SIMAT `eval.py`; evaluated by the m2-mix release, `main.py::SIMAT_eval`;
robust_finetuning.md §4.4).

The SIMAT database holds N images, each one (subject, relation, object) triplet; C captions name the
distinct triplets. A transformation asks to change one word of an image's triplet: source image r
(in the database), value word a (in r's triplet), target word b, and the caption c of the triplet
with a replaced by b. With unit image embeddings x_i and unit word embeddings w (the text tower on
the bare word, no prompt template), for each lambda:

    query_t = x_r + lambda * (w_b - w_a)        (not renormalised: the argmax below does not care)
    retrieved_t = argmax_{i != r} <query_t, x_i>    (the nearest database image other than r)
    success_t = oscar[retrieved_t, c] > 0.5         (OSCAR's image-caption similarity, the oracle)

    SIMAT@lambda = 100 * sum_t weight_t * success_t / sum_t weight_t,   weight_t = 1 / sqrt(norm2_t)

(`norm2` is a column of the transformation table; in the official transfos.csv it equals the number
of transformations, dev and test together, that replace the same word `value`, so the words
replaced most often weigh less each.) The release reports the best lambda of
{0.5, 1, 1.5, ..., 6, 7} (no 6.5): `simat` is that maximum, `simat_lambda` its lambda (the first on
a tie) and `simat@<lambda>` each value.

Ties: the release takes `topk(5)` and skips the source image if it comes first; here the source's
score is masked out and the first maximum is taken. The two differ only on exactly equal scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: The m2-mix release's lambdas (`main.py::SIMAT_eval`).
SIMAT_LAMBDAS: tuple[float, ...] = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7)
#: An OSCAR similarity above this counts as a correct transformation (SIMAT `eval.py`).
OSCAR_THRESHOLD = 0.5
_CHUNK = 1024  # transformations scored at once: (chunk, N) similarities in memory


def lambda_key(lam: float) -> str:
    """`simat@<lambda>` with the shortest exact spelling: `simat@0.5`, `simat@1`, `simat@7`."""
    return f"simat@{float(lam):g}"


def simat_retrieve(image_emb: Tensor, query: Tensor, source: Tensor, chunk: int = _CHUNK) -> Tensor:
    """Index of the database image nearest each query (largest dot product), the query's own
    source image excluded. (T,)"""
    out = []
    for s in range(0, len(query), chunk):
        sim = query[s : s + chunk] @ image_emb.t()
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, source[s : s + chunk]] = float("-inf")
        out.append(sim.argmax(dim=1))
    return torch.cat(out) if out else source.new_zeros(0)


def simat_score(
    image_emb: Tensor,
    word_emb: Tensor,
    source: Tensor | Sequence[int],
    value: Tensor | Sequence[int],
    target: Tensor | Sequence[int],
    target_caption: Tensor | Sequence[int],
    norm2: Tensor | Sequence[float],
    oscar: Tensor,
    lambdas: Sequence[float] = SIMAT_LAMBDAS,
    threshold: float = OSCAR_THRESHOLD,
) -> dict[str, float]:
    """SIMAT scores (module docstring) of one embedding model.

    Args:
        image_emb: (N, D) embeddings of the database images, in the database's order (normalised
            here).
        word_emb: (W, D) embeddings of the words (normalised here).
        source: (T,) database index of each transformation's source image.
        value, target: (T,) row of `word_emb` of the word replaced / the word put in its place.
        target_caption: (T,) column of `oscar` of the transformed triplet's caption.
        norm2: (T,) the table's `norm2`; weight_t = norm2_t ** -0.5, normalised.
        oscar: (N, C) OSCAR similarity of each database image to each caption.
        lambdas: lambdas to try.
        threshold: an OSCAR similarity above it is a success.

    Returns:
        `simat` (max over lambdas, percent), `simat_lambda` (its lambda) and `simat@<lambda>`.
    """
    if not len(lambdas):
        raise ValueError("simat_score: no lambdas")
    keys = [lambda_key(lam) for lam in lambdas]
    if len(set(keys)) != len(keys):
        raise ValueError(f"simat_score: repeated lambdas in {list(lambdas)}")
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    x = F.normalize(image_emb.to(dtype), dim=-1)
    w = F.normalize(word_emb.to(device=x.device, dtype=dtype), dim=-1)

    def idx(v: Tensor | Sequence[int]) -> Tensor:
        return torch.as_tensor(v, dtype=torch.long, device=x.device).reshape(-1)

    src, val, tgt, cap = idx(source), idx(value), idx(target), idx(target_caption)
    n2 = torch.as_tensor(norm2, dtype=torch.float64, device=x.device).reshape(-1)
    oscar = torch.as_tensor(oscar, device=x.device)
    n_t = len(src)
    if n_t == 0:
        raise ValueError("simat_score: no transformations")
    if len(x) < 2:
        raise ValueError("simat_score: the database needs 2 images or more")
    if not len(val) == len(tgt) == len(cap) == len(n2) == n_t:
        raise ValueError(
            f"simat_score: transformation fields differ in length (source {n_t}, value {len(val)}, "
            f"target {len(tgt)}, target_caption {len(cap)}, norm2 {len(n2)})"
        )
    if oscar.dim() != 2 or oscar.shape[0] != len(x):
        raise ValueError(
            f"simat_score: oscar is {tuple(oscar.shape)}, not (images={len(x)}, captions)"
        )
    for name, v, n in (
        ("source", src, len(x)),
        ("value", val, len(w)),
        ("target", tgt, len(w)),
        ("target_caption", cap, oscar.shape[1]),
    ):
        if v.min() < 0 or v.max() >= n:
            raise ValueError(f"simat_score: {name} indices outside 0..{n - 1}")
    if not bool((n2 > 0).all()):
        raise ValueError("simat_score: norm2 must be positive")
    weights = n2.rsqrt()
    weights = weights / weights.sum()

    base, delta = x[src], w[tgt] - w[val]
    out: dict[str, float] = {}
    best_key, best_lam = keys[0], float(lambdas[0])
    for key, lam in zip(keys, lambdas, strict=True):
        got = simat_retrieve(x, base + float(lam) * delta, src)
        success = (oscar[got, cap] > threshold).to(torch.float64)
        out[key] = float(100.0 * (weights * success).sum())
        if out[key] > out[best_key]:
            best_key, best_lam = key, float(lam)
    out["simat"] = out[best_key]
    out["simat_lambda"] = best_lam
    return out
