"""A finished run another method builds on: WiSE-FT reads a fine-tuned run, LP-FT can read an LP run.

`SourceRun.load(method, model)` returns the run's checkpoint state dict after checking, before anything
trains, that the run finished (`metrics.json`), that it has a checkpoint, and that it fine-tuned the
same backbone (`model` name in its record, tensor shapes). Each failure is one line naming the command
that makes the run (`python train.py experiment=<experiment> seed=<seed>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reprolab.errors import ReprolabError
from reprolab.utils.run_record import METRICS_FILE


class SourceRunError(ReprolabError, ValueError):
    """The run a method builds on is missing, unfinished, or of another model."""


@dataclass
class SourceRun:
    """Where a finished run lives and which experiment makes it.

    Args:
        run_dir: the run directory (`<log_dir>/<cell>/seed<seed>`).
        experiment: the experiment that makes it (for the error message's command).
    """

    run_dir: str
    experiment: str | None = None

    @classmethod
    def parse(cls, method: str, value: Any) -> SourceRun:
        if isinstance(value, SourceRun):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and value.get("run_dir"):
            return cls(str(value["run_dir"]), value.get("experiment"))
        raise SourceRunError(
            f"method={method} needs method.source.run_dir (the run dir of the run it builds on), "
            f"got {value!r}."
        )

    def command(self) -> str:
        m = re.fullmatch(r"seed(\d+)", Path(self.run_dir).name)
        seed = f" seed={m.group(1)}" if m else ""
        exp = self.experiment or "<the experiment of that run>"
        return f"python train.py experiment={exp}{seed}"

    def checkpoint(self) -> Path | None:
        ckpts = Path(self.run_dir) / "checkpoints"
        rounds = sorted(ckpts.glob("round*/last.ckpt"), key=lambda p: int(p.parent.name[5:]))
        for p in [ckpts / "last.ckpt", *reversed(rounds)]:
            if p.is_file():
                return p
        return None

    def load(self, method: str, model_name: str | None) -> dict[str, Tensor]:
        """The run's checkpoint `state_dict`, after the checks above."""
        record_file = Path(self.run_dir) / METRICS_FILE
        if not record_file.is_file():
            raise SourceRunError(
                f"method={method} builds on the run {self.run_dir}, which has not finished (no "
                f"{METRICS_FILE}); make it first: {self.command()}"
            )
        record = json.loads(record_file.read_text())
        if model_name is not None and record.get("model") not in (None, model_name):
            raise SourceRunError(
                f"method={method}: the run {self.run_dir} fine-tuned model={record.get('model')}, "
                f"not model={model_name}; point method.source at a run of this model or rerun it: "
                f"{self.command()} model={model_name}"
            )
        ckpt = self.checkpoint()
        if ckpt is None:
            raise SourceRunError(
                f"method={method}: the run {self.run_dir} kept no checkpoint (checkpoints/last.ckpt);"
                f" rerun it with checkpointing on: {self.command()} on_config_change=replace"
            )
        return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def check_shapes(
    method: str, source: SourceRun, state: dict[str, Tensor], module: nn.Module, prefix: str
) -> dict[str, Tensor]:
    """`state`'s entries under `prefix`, stripped of it, checked against `module`'s state dict."""
    own = module.state_dict()
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(sub))
    bad = sorted(k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape))
    if missing or bad:
        what = f"lacks {missing[:3]}" if missing else f"has other shapes for {bad[:3]}"
        raise SourceRunError(
            f"method={method}: the checkpoint of {source.run_dir} does not match this model "
            f"({prefix}* {what}); make a matching run: {source.command()}"
        )
    return sub
