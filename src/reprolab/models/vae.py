"""MLP variational autoencoder network for tabular rows (Kingma & Welling, "Auto-Encoding Variational
Bayes", ICLR 2014, arXiv:1312.6114): Gaussian encoder q(z|x) and a decoder that returns the
parameters of p(x|z) column by column. The likelihood itself lives in the method
(`reprolab.methods.generative.vae`); this module only maps tensors to tensors.

Built by the method from the task's sizes: `configs/model/tabular_vae.yaml` is a `_partial_: true`
factory, and the method calls it with `num_features` (width of the encoded row) and `param_widths`
(how many decoder outputs each column takes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers through `sizes`, `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class TabularVAENet(nn.Module):
    """Encoder x -> (mu, logvar) of q(z|x); decoder z -> one parameter block per column.

    Args:
        num_features: width of the encoded row `x` (one-hot categoricals included).
        param_widths: decoder outputs per column, in column order (1 for a Gaussian mean or a
            Bernoulli logit, K for the logits of a K-way categorical).
        latent_dim: size of z.
        hidden: hidden layer sizes of the encoder; the decoder mirrors them.
        activation: one of `ACTIVATIONS`.
        name: model config name (lands in the run record).
    """

    def __init__(
        self,
        num_features: int,
        param_widths: Sequence[int],
        latent_dim: int = 8,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        name: str = "tabular_vae",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            from reprolab.utils.naming import unknown_name

            raise ValueError(unknown_name("activation", activation, ACTIVATIONS))
        if num_features < 1 or latent_dim < 1 or not param_widths:
            raise ValueError(
                f"{name}: needs num_features >= 1, latent_dim >= 1 and at least one column "
                f"(got {num_features}, {latent_dim}, {list(param_widths)})."
            )
        self.name = name
        self.num_features = int(num_features)
        self.latent_dim = int(latent_dim)
        self.param_widths = [int(w) for w in param_widths]
        hidden = [int(h) for h in hidden]
        # The last encoder layer outputs mu and logvar side by side; a separate trunk would add
        # nothing at these sizes.
        self.encoder = mlp([self.num_features, *hidden, 2 * self.latent_dim], activation)
        self.decoder = mlp([self.latent_dim, *hidden[::-1], sum(self.param_widths)], activation)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x): (B, L) each."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> list[Tensor]:
        """Per-column parameters of p(x|z): a list of (..., width_j) tensors."""
        return list(torch.split(self.decoder(z), self.param_widths, dim=-1))
