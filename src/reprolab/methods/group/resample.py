"""ReSample: ERM on group-balanced batches (SubpopBench `ReSample`; spec robustness_ood_prompting.md §1.7).

`YyzHarry/SubpopBench` `subpopbench/learning/algorithms.py` L203-204: "Naive resample, with no
changes to ERM, but enable balanced sampling in hparams" (`hparams_registry.py` L39-40 sets
`group_balanced: True` for ReSample; `train.py` then draws training items with replacement, weight
1 / size of their group). The loss is ERM's batch mean; the balance is the data module's job:
`data.sampler=group_balanced` (both `ClassificationDataModule` and `VectorGroupDataModule`).

The method cannot set the sampler itself (a data module's `configure` accepts `preprocess`, not
`sampler`), so when the fit starts it checks that the data module it trains on draws group-balanced
batches, and fails in one line naming the override otherwise.
"""

from __future__ import annotations

from reprolab.errors import ConfigValueError
from reprolab.methods.group.erm import ERM

SAMPLER = "group_balanced"


class ReSample(ERM):
    """ERM that requires the data module's group-balanced sampler (see the module docstring)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.check_sampler(self._trainer.datamodule if self._trainer is not None else None)

    def check_sampler(self, datamodule: object) -> None:
        """One-line error unless `datamodule.sampler == "group_balanced"`."""
        sampler = getattr(datamodule, "sampler", None)
        if sampler != SAMPLER:
            where = (
                f"data={getattr(datamodule, 'name', type(datamodule).__name__)} has sampler={sampler}"
                if datamodule is not None
                else "there is no data module to draw them"
            )
            raise ConfigValueError(
                f"method={self.name} is ERM on group-balanced batches, but {where}; set "
                f"data.sampler={SAMPLER} (++data.sampler={SAMPLER} if the data config has no "
                "sampler key)."
            )
