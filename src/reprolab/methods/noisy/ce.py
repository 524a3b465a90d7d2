"""CE on noisy labels: NPC's `no_stop` and `vanilla` baselines (upstream `BaeHeeSun/NPC` @ 928f4d0,
`library/CE.py`, `library/ES.py`; robustness_ood_prompting.md §4.5).

`ce_noisy` trains with the mean cross-entropy against ỹ for all epochs and tests the last network;
`ce_early` is the same with upstream's early stopping on the noisy validation split
(`early_stop=true`, `NoisyLabelMethod`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reprolab.methods.noisy.base import NoisyLabelMethod


class CE(NoisyLabelMethod):
    """Cross-entropy against the noisy labels (`nn.CrossEntropyLoss()`, mean over the batch)."""

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits.float(), batch["label"])
