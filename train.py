"""Hydra entry point: `python train.py experiment=blackvip_caltech` (see configs/train.yaml).

Config values are checked right after composition (`reprolab.utils.checks.check_values`), before
torch, Lightning or open_clip is imported, so an ordinary mistake costs a second, not a model build.

When things go wrong:
- an ordinary mistake (a bad value, missing or malformed data, a table or task mismatch: any
  `reprolab.errors.ReprolabError`, `TaskInfoError`, `TableConfigError`, `DataNotFoundError`) prints
  `error: <what, where, how to fix>` on stderr and exits with status 2; set `REPROLAB_DEBUG=1` in
  the environment to get the full traceback as well;
- an exception that carries an int `exit_code` (a run interrupted by SIGTERM / SIGINT: 128 + the
  signal) prints its message and exits with that status;
- in a Hydra `--multirun`, an ordinary error of one job is reported in one line, recorded in the
  cell's failed.json, and re-raised as an exception (not `sys.exit`), so Hydra records that job as
  failed and runs the others; `FailedCells` (reprolab.tables.hydra_callbacks) lists them all at the end;
- anything else is a bug: its traceback is printed as usual.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import reprolab  # noqa: E402,F401 - registers ${trial_dir:} of the run dir (omegaconf only, no torch)

USER_ERROR_STATUS = 2  # as argparse: the command line (here, the config) was wrong


def _debug() -> bool:
    return os.environ.get("REPROLAB_DEBUG", "").lower() not in ("", "0", "false", "no")


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # HydraConfig not set: main() called outside Hydra's runtime
        return False


def _report(exc: BaseException) -> None:
    """Print `error: <one line>` (and the traceback with REPROLAB_DEBUG=1), or re-raise.

    Exits with the exception's `exit_code` (signals) or 2 (ordinary errors); in a multirun an
    ordinary error is re-raised so that only its job fails. A bug is re-raised untouched.
    """
    from reprolab.errors import exit_code_of, find_user_error, one_line

    code = exit_code_of(exc)
    if code is None and not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt as usual
        raise exc
    user = find_user_error(exc) if code is None else exc
    if user is None:
        raise exc
    if _debug():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {one_line(user)}", file=sys.stderr, flush=True)
    if code is None and _multirun():
        if _debug():
            raise user
        raise user.with_traceback(None) from None  # Hydra reports it again at the end: keep short
    sys.exit(USER_ERROR_STATUS if code is None else code)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    OmegaConf.set_struct(cfg, False)
    cfg.experiment_name = choices.get("experiment")
    cfg.table_name = choices.get("table")
    started = False
    try:
        from reprolab.utils.checks import check_values

        check_values(cfg)  # before the heavy imports below
        from reprolab.train import run
        from reprolab.utils.loggers import quiet_library_loggers

        quiet_library_loggers()  # Lightning's own console handler, now that it is imported
        started = True
        run(cfg)  # from here on, run() writes failed.json itself
    except BaseException as exc:  # sorted into signals, user errors and bugs by _report
        if not started and _multirun():
            # A cell of a table that cannot start is `failed` (with its reason), not `missing`,
            # for the aggregator. A single run just prints the error: no run dir for a typo.
            from reprolab.utils.run_record import record_cannot_start

            record_cannot_start(cfg, exc)
        _report(exc)


if __name__ == "__main__":
    main()
