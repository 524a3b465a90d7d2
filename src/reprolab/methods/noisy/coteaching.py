"""Co-teaching (Han et al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely
Noisy Labels", NeurIPS 2018), NPC's `coteaching` baseline (upstream `BaeHeeSun/NPC` @ 928f4d0,
`library/COTEACHING.py`; robustness_ood_prompting.md §4.5).

Two networks see the same batch. Each ranks the batch by its own per-sample CE and keeps the
int((1 − r_e)·B) smallest; each network then takes a CE step on the samples its PEER kept. The
forget rate r_e ramps linearly from 0 to r over the first `num_gradual` = 10 epochs
(`np.linspace(0, r, 10)`, so epoch 9 reaches r) and stays at r; r is the nominal noise rate
(`forget_rate: null` reads `datamodule.noise_rate`: the data's rate, 0.38 for Clothing1M and 0.27
for Food-101N as upstream). Adam (lr 1e-3) with Co-teaching's schedule: from epoch
`lr_decay_start` (80 for MNIST/FMNIST/CIFAR-10; null: int(0.6·epochs), upstream's other datasets)
the rate decays linearly, lr·(E − e)/(E − start), and β1 drops from 0.9 to 0.1.

One Adam over both networks with loss₁ + loss₂ is the same update as upstream's two optimisers:
each loss depends on one network's parameters only (the peer's selection enters as indices) and
Adam is per-parameter.

The tested network (`select_net`): `test` (upstream) evaluates both on the first test set after the
last epoch and keeps the more accurate one: a choice made on test labels, as the released code
makes it; `net1` always keeps the first. The choice is a buffer (`selected`), so it is in the
checkpoint a post-processor rebuilds the classifier from.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.errors import ConfigValueError
from reprolab.methods.noisy.base import NoisyLabelMethod, make_head, net_forward

log = logging.getLogger(__name__)

SELECT = ("test", "net1")


def forget_rate_schedule(forget_rate: float, epochs: int, num_gradual: int = 10) -> np.ndarray:
    """r_e for e = 0..epochs−1: `np.linspace(0, r, num_gradual)`, then r (upstream)."""
    sched = np.ones(int(epochs)) * float(forget_rate)
    n = min(int(num_gradual), int(epochs))
    sched[:n] = np.linspace(0, float(forget_rate), int(num_gradual))[:n]
    return sched


def lr_beta1(epoch: int, epochs: int, lr: float, decay_start: int) -> tuple[float, float]:
    """Co-teaching's (lr, β1) of an epoch: constant, then linear decay and β1 = 0.1."""
    if epoch < decay_start:
        return lr, 0.9
    return float(epochs - epoch) / (epochs - decay_start) * lr, 0.1


def coteaching_loss(
    logits1: Tensor, logits2: Tensor, labels: Tensor, forget_rate: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss of net 1 on net 2's small-loss samples, loss of net 2 on net 1's, the kept indices
    of net 1, of net 2). The kept count is int((1 − r)·B), at least 1 (upstream's CE over an empty
    selection would be NaN)."""
    loss1 = F.cross_entropy(logits1.float(), labels, reduction="none")
    loss2 = F.cross_entropy(logits2.float(), labels, reduction="none")
    keep = max(1, int((1 - float(forget_rate)) * len(labels)))
    idx1 = torch.argsort(loss1.detach())[:keep]
    idx2 = torch.argsort(loss2.detach())[:keep]
    return (
        F.cross_entropy(logits1[idx2].float(), labels[idx2]),
        F.cross_entropy(logits2[idx1].float(), labels[idx1]),
        idx1,
        idx2,
    )


def _pretrained(backbone: nn.Module) -> bool:
    """Whether the backbone starts from loaded weights (the second network then does too)."""
    weights = getattr(backbone, "weights", None)
    return (weights is not None and weights != "random init") or bool(
        getattr(backbone, "pretrained", None)
    )


def fresh_copy(backbone: nn.Module) -> nn.Module:
    """A second network like `backbone`: the same pretrained weights, or a new random init."""
    twin = copy.deepcopy(backbone)
    if not _pretrained(backbone):
        for m in twin.modules():
            if callable(getattr(m, "reset_parameters", None)) and m is not twin:
                m.reset_parameters()
    return twin


class CoTeaching(NoisyLabelMethod):
    """Two networks that teach each other with their small-loss samples.

    Args:
        forget_rate: r (None: the data's `noise_rate`).
        num_gradual: epochs of the linear ramp of the forget rate (10).
        lr_decay_start: first epoch of the lr / β1 decay (None: int(0.6·epochs)).
        select_net: `test` (upstream) or `net1`.
        **kwargs: see `NoisyLabelMethod`.
    """

    def __init__(
        self,
        *args: Any,
        forget_rate: float | None = None,
        num_gradual: int = 10,
        lr_decay_start: int | None = 80,
        select_net: str = "test",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if select_net not in SELECT:
            raise ConfigValueError(
                f"method={self.name}: select_net must be one of {list(SELECT)}, got {select_net!r}."
            )
        if forget_rate is not None and not 0.0 <= float(forget_rate) < 1.0:
            raise ConfigValueError(
                f"method={self.name}: forget_rate must lie in [0, 1), got {forget_rate}."
            )
        self.backbone2 = fresh_copy(self.backbone)
        self.head2 = make_head(self.backbone2, self.head_input, len(self.classnames), self.name)
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))  # 0: net 1, 1: net 2
        self.forget_rate = None if forget_rate is None else float(forget_rate)
        self.num_gradual = int(num_gradual)
        self.lr_decay_start = None if lr_decay_start is None else int(lr_decay_start)
        self.select_net = select_net
        self._rate = self.forget_rate
        self._test_accs: tuple[float, float] | None = None

    # -- the two networks -----------------------------------------------------------------------
    def net_logits(self, which: int, images: Tensor) -> Tensor:
        bb, head = (self.backbone, self.head) if which == 0 else (self.backbone2, self.head2)
        return net_forward(bb, head, self.head_input, images)[1]

    def logits(self, images: Tensor) -> Tensor:
        return self.net_logits(int(self.selected), images)

    def embed(self, images: Tensor) -> Tensor:
        bb = self.backbone if int(self.selected) == 0 else self.backbone2
        return bb.encode_image(images).float()

    # -- schedules ------------------------------------------------------------------------------
    def _epochs(self) -> int:
        e = self.trainer.max_epochs
        if e is None or e < 1:
            raise ConfigValueError(
                f"method={self.name} schedules its forget rate and learning rate over epochs; set "
                "trainer.max_epochs."
            )
        return int(e)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.forget_rate is None:
            dm = getattr(self.trainer, "datamodule", None)
            rate = getattr(dm, "noise_rate", None)
            if rate is None:
                raise ConfigValueError(
                    f"method={self.name}: forget_rate=null reads the data's noise rate, and "
                    f"data={getattr(dm, 'name', '?')} has none; set method.forget_rate."
                )
            self._rate = float(rate)
            log.info("%s: forget rate %.3g (the data's noise rate)", self.name, self._rate)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epochs, e = self._epochs(), int(self.current_epoch)
        start = self.lr_decay_start if self.lr_decay_start is not None else int(epochs * 0.6)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                base = group.setdefault("base_lr", group["lr"])
                lr, b1 = lr_beta1(e, epochs, base, start)
                group["lr"] = lr
                if "betas" in group:
                    group["betas"] = (b1, group["betas"][1])
        self.log("train/forget_rate", self.current_forget_rate(), on_step=False, on_epoch=True)

    def current_forget_rate(self) -> float:
        e = int(self.current_epoch)
        return float(
            forget_rate_schedule(self._rate or 0.0, max(e + 1, self.num_gradual), self.num_gradual)[
                e
            ]
        )

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        logits1, logits2 = self.net_logits(0, images), self.net_logits(1, images)
        loss1, loss2, _, _ = coteaching_loss(logits1, logits2, labels, self.current_forget_rate())
        loss = loss1 + loss2
        b = len(labels)
        self.log("train/loss", loss / 2, prog_bar=True, batch_size=b)
        self.log_train_accuracy(logits1, batch)
        self.log_train_accuracy(logits2, batch, suffix="_net2")
        return loss

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits.float(), batch["label"])

    # -- choosing the network to test -----------------------------------------------------------
    def _last_epoch(self) -> bool:
        t = self.trainer
        if t.fast_dev_run:
            return True
        if t.max_epochs is not None and t.max_epochs > 0 and self.current_epoch + 1 >= t.max_epochs:
            return True
        return bool(t.max_steps and t.max_steps > 0 and t.global_step >= t.max_steps)

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint callback saves this epoch (Lightning calls the module's hook
        # before the monitoring callbacks'), so the choice is in last.ckpt.
        super().on_train_epoch_end()
        if self.select_net != "test" or not self._last_epoch():
            return
        dm = getattr(self.trainer, "datamodule", None)
        loaders = dm.test_dataloader() if dm is not None else []
        if not loaders:
            log.warning("%s: no test loader to choose a network with; keeping network 1", self.name)
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        correct, total = [0, 0], 0
        was = self.training
        self.eval()
        with torch.no_grad():
            for n, batch in enumerate(loader):
                if self.trainer.fast_dev_run and n >= 1:
                    break
                x = batch["image"].to(self.device)
                y = batch["label"].to(self.device)
                for which in (0, 1):
                    correct[which] += int((self.net_logits(which, x).argmax(-1) == y).sum())
                total += len(y)
        self.train(was)
        accs = (100.0 * correct[0] / max(total, 1), 100.0 * correct[1] / max(total, 1))
        self._test_accs = accs
        self.selected.fill_(int(accs[0] < accs[1]))  # upstream: int(acc1 < acc2); ties keep net 1
        log.info(
            "%s: test accuracy net 1 %.2f, net 2 %.2f: keeping network %d (upstream's choice)",
            self.name,
            accs[0],
            accs[1],
            int(self.selected) + 1,
        )

    def extra_metrics(self) -> dict[str, float]:
        out = super().extra_metrics()
        out["train/selected_net"] = float(int(self.selected) + 1)
        if self._test_accs is not None:
            out["test/net1_acc"], out["test/net2_acc"] = self._test_accs
        return out

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "test/net1_acc", "test/net2_acc")
