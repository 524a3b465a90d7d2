"""The one "did you mean" helper for unknown names (datasets, groups, encoders, table keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest option, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, options: Iterable[str]) -> str:
    """`Unknown <kind> '<name>'; available: a, b, c (did you mean 'b'?)`.

    A list or tuple of options keeps its order (a table's rows as declared); any other iterable
    (a set, a registry's keys) is sorted.
    """
    opts = [str(o) for o in options]
    if not isinstance(options, (list, tuple)):
        opts.sort()
    return f"Unknown {kind} '{name}'; available: {', '.join(opts)}{did_you_mean(name, opts)}"
