"""The text tables the benchmarks print: one row per measured case, a case that could not run
as its first column and the reason."""

from __future__ import annotations


def print_rows(rows: list[dict], columns: list[str], width: int, digits: int, reason_key: str) -> None:
    """A header of `columns`, then each row's cells (floats to `digits` significant digits);
    a row holding `reason_key` prints its first column and that reason instead."""
    print("  ".join(f"{c:>{width}s}" for c in columns))
    for row in rows:
        if reason_key in row:
            print(f"{row[columns[0]]:>{width}s}  {reason_key}: {row[reason_key]}")
            continue
        cells = [row.get(c, "") for c in columns]
        print("  ".join(f"{c:>{width}.{digits}g}" if isinstance(c, float) else f"{str(c):>{width}s}" for c in cells))
