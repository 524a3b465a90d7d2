"""Likelihood metrics from summed negative log-likelihoods (nats).

- perplexity = exp(total NLL / number of tokens) (language models);
- bits per dimension = total NLL / (number of dimensions * ln 2) (images, densities);
- bits per token = total NLL / (tokens * ln 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp of the mean per-token NLL (nats)."""
    return math.exp(nll_sum / num_tokens)


def bits_per_dim(nll_sum: float, num_dims: int) -> float:
    """Mean NLL per dimension in bits."""
    return nll_sum / (num_dims * math.log(2))


class TokenNLL(Metric):
    """Sums per-token NLL (nats) and counts tokens; `compute` gives the mean NLL per token."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, num_tokens: int | Tensor) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += int(num_tokens)

    def compute(self) -> dict[str, Tensor]:
        mean = self.nll / self.tokens.clamp(min=1)
        return {
            "nll": mean.float(),
            "perplexity": mean.exp().float(),
            "bits_per_token": (mean / math.log(2)).float(),
        }
