"""Paper tables: config schema/validation (`schema`), aggregation of runs (`aggregate`), plots."""

from reprolab.tables.schema import (
    TableConfigError,
    TableSpec,
    list_tables,
    table_errors,
    validate_table,
)

__all__ = ["TableConfigError", "TableSpec", "list_tables", "table_errors", "validate_table"]
