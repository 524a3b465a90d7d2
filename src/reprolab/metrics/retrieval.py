"""Image-text retrieval: recall@K (the fraction of queries whose match is among the top K).

`similarity` is (N_images, N_texts). Each image may have several captions (COCO: 5, Flickr30k: 5):
`text_to_image[j]` is the image of caption j. Image->text recall@K counts an image as a hit when any
of its captions is in its top K; text->image counts a caption when its image is in its top K
(the protocol of CLIP, Radford et al. 2021, and of the retrieval fine-tuning papers).
"""

from __future__ import annotations

import torch
from torch import Tensor


def recall_at_k(
    similarity: Tensor, text_to_image: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """`i2t_r@K` and `t2i_r@K` (percent) for every K in `ks`."""
    n_img, n_txt = similarity.shape
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must be ({n_txt},), got {tuple(text_to_image.shape)}")
    match = text_to_image.unsqueeze(0) == torch.arange(n_img, device=similarity.device)[:, None]
    out: dict[str, float] = {}
    for k in ks:
        top_t = similarity.topk(min(k, n_txt), dim=1).indices  # (N_img, k)
        i2t = match.gather(1, top_t).any(1).float().mean()
        top_i = similarity.t().topk(min(k, n_img), dim=1).indices  # (N_txt, k)
        t2i = (top_i == text_to_image[:, None]).any(1).float().mean()
        out[f"i2t_r@{k}"] = 100.0 * float(i2t)
        out[f"t2i_r@{k}"] = 100.0 * float(t2i)
    return out
