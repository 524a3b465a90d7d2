"""Lightning loggers that are safe offline, and quiet library logging.

W&B never blocks on the network or asks to log in. By default a run prints reprolab's own INFO lines
and Lightning's once each, and no INFO chatter of open_clip (see `LibraryNoiseFilter`, installed on
the console and file handlers by `configs/hydra/default.yaml`, and `quiet_library_loggers`).
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Libraries that log routine INFO lines (open_clip: about ten per model build) through the root
# logger; their warnings and errors still show.
NOISY_LIBRARIES = ("open_clip",)
# Lightning's advertisement for another package, printed at every Trainer construction.
_NOISE_PREFIXES = ("\N{ELECTRIC LIGHT BULB} Tip:",)


class LibraryNoiseFilter(logging.Filter):
    """Drops INFO-and-below records logged from inside a noisy library, and Lightning's tips."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        path = record.pathname.replace("\\", "/")
        if any(f"/{lib}/" in path for lib in NOISY_LIBRARIES):
            return False
        return not str(record.msg).startswith(_NOISE_PREFIXES)


def quiet_library_loggers() -> None:
    """Let Lightning's records reach the configured handlers once, not twice.

    `import lightning` adds its own console handler to the `lightning` logger, which also propagates
    to the root logger that Hydra's job logging configured: every Lightning INFO line was printed
    twice. When the root logger has handlers, Lightning's own is removed (call after importing
    Lightning; without configured logging, e.g. in a bare `python -c`, nothing changes).
    """
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # Lightning's own, not a file handler
                lg.removeHandler(h)
        lg.propagate = True


def wandb_mode() -> str:
    """`WANDB_MODE` if set; otherwise online only when credentials exist, else offline.

    `dryrun` is W&B's old name for `offline` (Lightning's WandbLogger still writes it into the
    environment); it is reported as `offline`, so every run of a multirun says the same.
    """
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"].strip().lower()
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def wandb_logger(
    run_dir: str,
    project: str,
    group: str,
    name: str,
    tags: list[str],
    job_type: str = "train",
    entity: str | None = None,
    config: dict[str, Any] | None = None,
):
    """A WandbLogger whose run id is kept in `<run_dir>/wandb_id.txt`, so a requeued job resumes it."""
    from lightning.pytorch.loggers import WandbLogger

    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    id_file = run_path / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        id_file.write_text(run_id + "\n")
    mode = wandb_mode()
    log.info("W&B run %s (%s mode), group %s", run_id, mode, group)
    return WandbLogger(
        project=project,
        entity=entity,
        group=group,
        name=name,
        tags=list(tags),
        id=run_id,
        resume="allow",
        save_dir=str(run_path),
        job_type=job_type,
        # `mode` goes to wandb.init; Lightning's own `offline=True` would also set
        # WANDB_MODE=dryrun in this process, so the next job of a multirun would say "dryrun".
        mode=mode,
        offline=False,
        config=config,
        settings={"silent": True, "init_timeout": 60} if mode != "disabled" else None,
    )
