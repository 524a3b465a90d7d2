"""`TaskDataModule`: the data-module side of the task contract.

Every data module publishes `info` (a record from `reprolab.data.info`) once it is constructed, and
accepts `configure(**requirements)`: the values a method asks for before the loaders run (image
preprocessing for a backbone, say). The runner passes them along without knowing what they are.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from reprolab.data.info import TaskInfo


class TaskDataModule(L.LightningDataModule):
    """A LightningDataModule that describes its task (`info`) and takes method requirements."""

    accepts: tuple[str, ...] = ()  # keys `configure` understands

    @property
    def info(self) -> TaskInfo:
        raise NotImplementedError

    def configure(self, **requirements: Any) -> None:
        """Apply what the method needs from the data; unknown requirements fail in one line."""
        unknown = sorted(set(requirements) - set(self.accepts))
        if unknown:
            raise ValueError(
                f"data={getattr(self, 'name', type(self).__name__)} cannot provide {unknown} that "
                f"the method asks for (it accepts: {list(self.accepts) or 'nothing'})."
            )
        for key, value in requirements.items():
            getattr(self, f"set_{key}")(value)
