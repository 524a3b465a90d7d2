"""Every paper table with its cell and seed counts (`make tables`); invalid tables say why."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-dir", default=str(ROOT / "configs"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from reprolab.tables.schema import TableConfigError, table_names, validate_table

    names = table_names(args.config_dir)
    if not names:
        print(f"no tables under {args.config_dir}/table")
        return 0
    rows, bad = [], []
    for name in names:
        try:
            s = validate_table(name, args.config_dir)
        except TableConfigError as exc:
            bad.append(str(exc))
            rows.append((name, "INVALID", "", "", "", ""))
            continue
        rows.append(
            (
                name,
                f"{s.paper}/{getattr(s, 'output', None) or s.id}",
                str(s.n_cells),
                str(len(s.seeds)),
                str(s.n_jobs),
                s.title,
            )
        )
    header = ("table", "paper/id", "cells", "seeds", "runs", "title")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    for msg in bad:
        print("\n" + msg, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
