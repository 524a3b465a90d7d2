"""Errors a user can fix: one line that says what is wrong, where, and how to fix it.

`ReprolabError` is the common base; the entry point (`train.py`) prints such an error as
`error: <message>` and exits with status 2, without a traceback (unless `REPROLAB_DEBUG=1`).
This module imports the standard library only, so it is safe to import before torch.
"""

from __future__ import annotations

# Ordinary errors defined elsewhere that predate `ReprolabError` (module, class name): recognised
# by name so that nothing has to be imported to test for them.
_KNOWN_USER_ERRORS = {
    ("reprolab.data.info", "TaskInfoError"),
    ("reprolab.tables.schema", "TableConfigError"),
    ("reprolab.data.spec", "DataNotFoundError"),
}


class ReprolabError(Exception):
    """An ordinary mistake (a config value, missing or malformed data): the message is the report."""


class ConfigValueError(ReprolabError, ValueError):
    """A config value is invalid (wrong type or out of range); raised before anything is built."""


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is an ordinary user error (a `ReprolabError` or a known one-line error)."""
    if isinstance(exc, ReprolabError):
        return True
    return any((c.__module__, c.__qualname__) in _KNOWN_USER_ERRORS for c in type(exc).__mro__)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user error `exc` is or wraps (Hydra's InstantiationException wraps what a constructor
    raised, as `__cause__`), or None when it is a genuine bug."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if is_user_error(cur):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def exit_code_of(exc: BaseException) -> int | None:
    """The exit status an exception asks for: the protocol is an int attribute `exit_code` (a run
    interrupted by a signal carries 128 + the signal number)."""
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def single_line(text: str | None, limit: int) -> str:
    """`text` on one line (chained messages often put the cause on line 2), cut at `limit`."""
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def one_line(exc: BaseException) -> str:
    """The message of `exc` (its class name when it has none)."""
    msg = str(exc).strip()
    return msg or type(exc).__name__
