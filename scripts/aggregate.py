"""Finished runs -> `results/<paper>/<id>.{md,csv,png}` for one paper table.

python scripts/aggregate.py blackvip_tiny                    # metrics.json under $LOG_ROOT or logs/
python scripts/aggregate.py blackvip_tiny --from /scratch/me/logs
python scripts/aggregate.py --paper blackvip_cvpr23 --table tab2 --source wandb --entity me
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "name",
        nargs="?",
        help="table config name (configs/table/<name>.yaml); `table=<name>` also works",
    )
    p.add_argument("--paper", help="with --table: find the table config by paper id ...")
    p.add_argument("--table", dest="table_id", help="... and table id (table.paper / table.id)")
    p.add_argument(
        "--from",
        dest="log_root",
        default=None,
        help="log root with <cell>/seed<n>/metrics.json (default: $LOG_ROOT or logs)",
    )
    p.add_argument("--source", choices=["files", "wandb"], default="files")
    p.add_argument("--out", default=str(ROOT / "results"), help="output root (default: results/)")
    p.add_argument("--config-dir", default=str(ROOT / "configs"))
    p.add_argument(
        "--entity", default=None, help="W&B entity (default: $WANDB_ENTITY or your default)"
    )
    p.add_argument(
        "--project", default=None, help="W&B project (default: $WANDB_PROJECT or reprolab)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the .png")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if any cell has missing or failed seeds"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from reprolab.tables.aggregate import WandbUnavailableError, aggregate_table
    from reprolab.tables.schema import TableConfigError, find_table, validate_table

    name = args.name.removeprefix("table=") if args.name else None
    try:
        if name is None:
            if not (args.paper and args.table_id):
                p.error("give a table name, or --paper and --table")
            name = find_table(args.paper, args.table_id, args.config_dir)
        spec = validate_table(name, args.config_dir)
        log_root = args.log_root or os.environ.get("LOG_ROOT") or "logs"
        result, paths = aggregate_table(
            spec,
            log_root=log_root,
            source=args.source,
            out_dir=args.out,
            plot=not args.no_plot,
            entity=args.entity,
            project=args.project,
        )
    except (TableConfigError, WandbUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for c in result.cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"{spec.name}: {summary}")
    for path in paths.values():
        print(f"wrote {path}")
    incomplete = any(c.status in {"partial", "failed", "missing"} for c in result.cells)
    return 1 if args.strict and incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
