"""Lightning loggers that are safe offline: W&B never blocks on the network or asks to log in."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """`WANDB_MODE` if set; otherwise online only when credentials exist, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
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
        mode=mode,
        offline=mode == "offline",
        config=config,
        settings={"silent": True, "init_timeout": 60} if mode != "disabled" else None,
    )
