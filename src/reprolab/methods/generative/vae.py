"""Variational autoencoder on tabular rows (Kingma & Welling, "Auto-Encoding Variational Bayes",
ICLR 2014, arXiv:1312.6114): the baseline fair and causal VAEs on tables build on.

Objective (Eq. 3 of the paper, with the KL in closed form as in its Appendix B):

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),   q(z|x) = N(mu(x), diag(exp(logvar(x))))

and a likelihood that factorises over the columns of the row (`column_log_likelihood`):
- continuous: Gaussian with the decoder's mean and one learned standard deviation per column
  (`gaussian_scale: learned`, the default), floored at `min_std`. A fixed unit variance on the
  standardised columns charges every continuous column at least 0.92 nats however well it is
  explained, so the ELBO could not show fit and the weight between continuous and discrete columns
  would be arbitrary; a per-row (decoder-predicted) variance collapses on small tables (310 training
  rows for diabetes). One scale per column keeps a proper density at no such risk.
  `gaussian_scale: fixed` keeps `init_std` instead;
- binary: Bernoulli with the decoder's logit;
- categorical: categorical with the decoder's K logits (the row holds the one-hot code).

Reported numbers are nats per row, higher is better, in the data module's encoding (continuous
columns standardised with train statistics: add `sum_j log std_j` of those statistics for raw units).
`val/elbo` and `test/elbo` are k-sample Monte Carlo estimates (`eval_samples`, the mean of k
single-sample ELBOs: the ELBO itself with less variance, not the tighter IWAE bound);
`test/recon` is the E_q log-likelihood term and `test/kl` the closed-form KL, so
elbo = recon - kl. Every test set logs `test/<set>/{elbo,recon,kl}`; the first also as `test/*`.
Training uses one reparameterised sample per row; `train/loss` is the negative ELBO (with `beta`,
the KL weight, at its default 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from reprolab.data.info import Column, TabularInfo
from reprolab.data.tabular import column_slices
from reprolab.methods.base import Method

LOG_2PI = math.log(2 * math.pi)
TERMS = ("elbo", "recon", "kl")


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row: (..., L) -> (...)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def column_log_likelihood(
    x: Tensor, params: Sequence[Tensor], columns: Sequence[Column], log_std: Tensor
) -> Tensor:
    """log p(x_j | z) for every column j: (..., F) row encodings -> (..., num_columns).

    Args:
        x: encoded rows (..., F), broadcast against the parameters' leading dimensions.
        params: per-column decoder outputs (..., width_j), as `TabularVAENet.decode` returns.
        columns: the columns of `x` in order.
        log_std: (num_continuous,) log standard deviations of the continuous columns, in order.
    """
    lead = params[0].shape[:-1]
    x = x.expand(*lead, x.shape[-1])
    out, j = [], 0
    for col, sl, p in zip(columns, column_slices(columns), params, strict=True):
        xc = x[..., sl]
        if col.kind == "continuous":
            ls = log_std[j]
            j += 1
            out.append(-0.5 * ((xc[..., 0] - p[..., 0]) / ls.exp()).pow(2) - ls - 0.5 * LOG_2PI)
        elif col.kind == "binary":
            out.append(-F.binary_cross_entropy_with_logits(p[..., 0], xc[..., 0], reduction="none"))
        else:
            out.append((xc * F.log_softmax(p, dim=-1)).sum(-1))
    return torch.stack(out, dim=-1)


class TabularVAE(Method):
    """A VAE over the encoded rows of a `TabularInfo` task (every column in `info.columns`).

    Args:
        model: a factory for the network (`configs/model/tabular_vae.yaml`, `_partial_: true`),
            called here as `model(num_features=..., param_widths=...)`; an `nn.Module` already
            built for these sizes is used as is.
        beta: KL weight of the training objective (1 = the ELBO; beta-VAE for other values).
            Evaluation always reports the ELBO (beta = 1).
        gaussian_scale: `learned` (one std per continuous column) or `fixed` (`init_std`).
        init_std: initial (or fixed) std of the continuous columns, in standardised units.
        min_std: floor of a learned std, so a near-constant column cannot drive log p to infinity.
        eval_samples: z samples per row of the validation and test ELBO estimates.
        **kwargs: see `Method` (`optimizer`, `scheduler`, ...).
    """

    info_type = TabularInfo
    requires = ("columns",)
    primary_metric = "test/elbo"

    def __init__(
        self,
        name: str,
        model: Callable[..., nn.Module] | nn.Module | None = None,
        info: TabularInfo | None = None,
        beta: float = 1.0,
        gaussian_scale: str = "learned",
        init_std: float = 1.0,
        min_std: float = 0.01,
        eval_samples: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        info = self.info
        if model is None:
            raise ValueError(
                f"method={name} needs a network from cfg.model (e.g. model=tabular_vae), got none."
            )
        if gaussian_scale not in ("learned", "fixed"):
            raise ValueError(
                f"method={name}: gaussian_scale must be 'learned' or 'fixed', got '{gaussian_scale}'."
            )
        if eval_samples < 1 or not 0 < min_std <= init_std:
            raise ValueError(
                f"method={name}: needs eval_samples >= 1 and 0 < min_std <= init_std "
                f"(got {eval_samples}, {min_std}, {init_std})."
            )
        self.columns: list[Column] = list(info.columns)
        widths = [c.width for c in self.columns]  # mean / logit / K logits per column
        if isinstance(model, nn.Module):
            self.vae = model
        else:
            self.vae = model(num_features=info.num_features, param_widths=widths)
        self.beta = float(beta)
        self.eval_samples = int(eval_samples)
        self.min_log_std = math.log(min_std)
        n_cont = sum(c.kind == "continuous" for c in self.columns)
        log_std = torch.full((n_cont,), math.log(init_std))
        if gaussian_scale == "learned":
            self.raw_log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("raw_log_std", log_std)
        self.test_specs = list(info.test_sets)
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in TERMS})
        self.test_metrics = nn.ModuleList(
            nn.ModuleDict({k: MeanMetric() for k in TERMS}) for _ in self.test_specs
        )

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (
            *super().metric_keys(),
            "train/recon",
            "train/kl",
            *(f"val/{k}" for k in TERMS),
            *(f"test/{k}" for k in TERMS),
            *(f"test/*/{k}" for k in TERMS),
            "model/std/*",
        )

    @property
    def log_std(self) -> Tensor:
        """Log std of the continuous columns: (num_continuous,)."""
        return self.raw_log_std.clamp(min=self.min_log_std)

    def elbo_terms(self, x: Tensor, samples: int = 1) -> dict[str, Tensor]:
        """Per-row `recon` (E_q log p(x|z), `samples`-sample estimate), `kl`, `elbo`: (B,) each."""
        mu, logvar = self.vae.encode(x)  # (B, L) each
        eps = torch.randn(samples, *mu.shape, device=mu.device, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps  # (S, B, L): reparameterisation
        ll = column_log_likelihood(x, self.vae.decode(z), self.columns, self.log_std)  # (S, B, C)
        recon = ll.sum(-1).mean(0)  # (B,)
        kl = gaussian_kl(mu, logvar)  # (B,)
        return {"elbo": recon - kl, "recon": recon, "kl": kl}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        t = self.elbo_terms(batch["x"])
        loss = -(t["recon"] - self.beta * t["kl"]).mean()
        n = len(batch["x"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(
            {"train/recon": t["recon"].mean(), "train/kl": t["kl"].mean()},
            on_step=False,
            on_epoch=True,
            batch_size=n,
        )
        return loss

    @torch.no_grad()
    def _update(self, metrics: nn.ModuleDict, x: Tensor) -> None:
        t = self.elbo_terms(x, self.eval_samples)
        for k in TERMS:
            metrics[k].update(t[k])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update(self.val_metrics, batch["x"])

    def on_validation_epoch_end(self) -> None:
        out = {f"val/{k}": m.compute() for k, m in self.val_metrics.items()}
        self.log_dict(out, prog_bar=False)
        for m in self.val_metrics.values():
            m.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.test_metrics[dataloader_idx], batch["x"])

    def on_test_epoch_end(self) -> None:
        out: dict[str, Tensor] = {}
        for i, (spec, metrics) in enumerate(zip(self.test_specs, self.test_metrics, strict=True)):
            for k, m in metrics.items():
                out[f"test/{spec.name}/{k}"] = m.compute()
                if i == 0:
                    out[f"test/{k}"] = out[f"test/{spec.name}/{k}"]
                m.reset()
        self.log_dict(out, add_dataloader_idx=False)

    def extra_metrics(self) -> dict[str, float]:
        """The learned std of each continuous column (standardised units)."""
        cont = [c.name for c in self.columns if c.kind == "continuous"]
        return {
            f"model/std/{n}": float(s)
            for n, s in zip(cont, self.log_std.detach().exp(), strict=True)
        }
