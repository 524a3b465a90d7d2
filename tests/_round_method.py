"""A test-only method with an outer loop of rounds (tests/test_contract.py)."""

from __future__ import annotations

import os
from typing import Any

from reprolab.methods.linear_probe import LinearProbe

CALLS: list[int] = []  # rounds started in this process


class RoundProbe(LinearProbe):
    """A linear probe fitted once per round; `round_state` records the rounds it has seen.

    `ROUND_PROBE_DIE_AT=<r>` makes `start_round(r)` raise, as a job killed in round r would die.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def start_round(self, round_idx: int, datamodule: Any) -> None:
        if os.environ.get("ROUND_PROBE_DIE_AT") == str(round_idx):
            raise RuntimeError(f"killed in round {round_idx}")
        CALLS.append(round_idx)
        self.seen.append(round_idx)

    def round_state(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_round_state(self, state: dict[str, Any], datamodule: Any) -> None:
        self.seen = list(state["seen"])
