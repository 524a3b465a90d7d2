"""The small CNNs NPC's classifiers train from scratch (robustness_ood_prompting.md §4.4; upstream
`BaeHeeSun/NPC` @ 928f4d0 `library/network.py`).

Both are featurizers in the framework's sense: `encode_image(images) -> (B, feature_dim)` is the
penultimate embedding (what NPC's KNN prior reads), and the method owns the last linear layer
(upstream's `linear3` / `l_c1`, Linear(feature_dim, K)). They publish `preprocess` (a
`reprolab.data.transforms.Preprocess`) as the other backbones do:

- `CNNMNIST` (`CNN_MNIST`, MNIST / Fashion-MNIST, 28x28): conv 1→8 (3x3, pad 1), ReLU, BatchNorm;
  conv 8→16, tanh; flatten 16·28·28; Linear → 784; dropout; Linear → 256 = the embedding. No
  activation between the linear layers (as upstream). Inputs as upstream's `ToTensor()` (mean 0, std
  1); a 3-channel input (the data module serves RGB) is averaged to one channel, which is exact for
  the grey images replicated over channels.
- `CNN9` (`CNN`, the 9-layer CNN of Co-teaching, CIFAR-10, 32x32): 3x3 convs 128,128,128 (pad 1),
  max-pool 2, dropout; 256,256,256 (pad 1), max-pool 2, dropout; 512, 256, 128 (no padding); each
  conv followed by BatchNorm and leaky ReLU (0.01); global average pool → 128 = the embedding.
  Inputs as upstream: `ToTensor()` + `Normalize(0.5, 0.5)`.

Dropout 0.3 in NPC's classifiers (`train_classifier.py: args.dropout`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.transforms import Preprocess
from reprolab.models.no_text import NoTextTower

log = logging.getLogger(__name__)


class _SmallCNN(NoTextTower, nn.Module):
    """What both CNNs share: name, trainable flag, preprocessing, `feature_dim`, `parts()`."""

    what_it_is = "a CNN without a text tower"

    def __init__(
        self, name: str, feature_dim: int, preprocess: Preprocess, trainable: bool
    ) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = int(feature_dim)
        self.preprocess = preprocess
        self.trainable = bool(trainable)

    def finish(self) -> None:
        """Freeze when not trainable, and log the size (after the layers exist)."""
        self.requires_grad_(self.trainable)
        if not self.trainable:
            self.eval()
        log.info(
            "Backbone %s (%s, embedding %d): trainable=%s, %d parameters",
            self.name,
            type(self).__name__,
            self.feature_dim,
            self.trainable,
            sum(p.numel() for p in self.parameters()),
        )

    def train(self, mode: bool = True) -> _SmallCNN:
        return super().train(mode and self.trainable)

    def frozen_state_prefixes(self) -> list[str]:
        """`[""]` (rebuilt from `cfg.model`) when frozen, `[]` when it trains."""
        return [] if self.trainable else [""]

    def parts(self) -> dict[str, list[tuple[str, nn.Module]]]:
        return {"image": [("", self)], "text": [], "scale": []}

    def reset_parameters(self) -> None:
        """A fresh random initialisation (PyTorch's defaults) of every layer."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)


class CNNMNIST(_SmallCNN):
    """Upstream's `CNN_MNIST` without its last layer (module docstring). (B, 1|3, 28, 28) -> (B, 256)

    Args:
        name: config name.
        dropout: dropout after the first linear layer (NPC: 0.3).
        trainable: train it (False: frozen, eval mode, out of checkpoints).
    """

    def __init__(
        self, name: str = "cnn_mnist", dropout: float = 0.3, trainable: bool = True
    ) -> None:
        super().__init__(
            name, 256, Preprocess(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear"), trainable
        )
        # Upstream's attribute names (fc1, fc2 are convolutions there too): its released
        # checkpoints map onto `backbone.*` with `linear3` as the method's `head`.
        self.fc1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.linear1 = nn.Linear(16 * 28 * 28, 28 * 28)
        self.linear2 = nn.Linear(28 * 28, 256)
        self.dropout = nn.Dropout(float(dropout))
        self.finish()

    def encode_image(self, images: Tensor) -> Tensor:
        x = images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images  # (B, 1, 28, 28)
        x = self.bn(F.relu(self.fc1(x)))  # upstream: BatchNorm after the ReLU
        x = torch.tanh(self.fc2(x)).flatten(1)
        return self.linear2(self.dropout(self.linear1(x)))  # (B, 256)


class CNN9(_SmallCNN):
    """Upstream's 9-layer `CNN` without its last layer (module docstring). (B, 3, 32, 32) -> (B, 128)

    Args:
        name: config name.
        dropout: channel dropout (`dropout2d`) after each max-pool (NPC: 0.3).
        eval_dropout: keep that dropout on at evaluation too. Upstream calls `F.dropout2d(h, p)`,
            whose `training` argument defaults to True, so its CIFAR-10 classifiers drop channels at
            test time as well; True reproduces that, False (default) is the usual train-only
            dropout (# DEVIATION from the released code, which the paper's numbers came from).
        trainable: train it (False: frozen, eval mode, out of checkpoints).
    """

    def __init__(
        self,
        name: str = "cnn9",
        dropout: float = 0.3,
        eval_dropout: bool = False,
        trainable: bool = True,
    ) -> None:
        super().__init__(
            name, 128, Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"), trainable
        )
        widths = [(3, 128), (128, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 256), (256, 128)]  # fmt: skip
        for k, (i, o) in enumerate(widths, 1):  # upstream's names c1..c9, bn1..bn9 (head: l_c1)
            setattr(self, f"c{k}", nn.Conv2d(i, o, 3, stride=1, padding=1 if k <= 6 else 0))
            setattr(self, f"bn{k}", nn.BatchNorm2d(o))
        self.p = float(dropout)
        self.eval_dropout = bool(eval_dropout)
        self.finish()

    def encode_image(self, images: Tensor) -> Tensor:
        h = images
        for k in range(1, 10):
            h = F.leaky_relu(
                getattr(self, f"bn{k}")(getattr(self, f"c{k}")(h)), negative_slope=0.01
            )
            if k in (3, 6):
                h = F.max_pool2d(h, kernel_size=2, stride=2)
                h = F.dropout2d(h, p=self.p, training=self.training or self.eval_dropout)
        return F.avg_pool2d(h, kernel_size=h.shape[2]).flatten(1)  # (B, 128)
