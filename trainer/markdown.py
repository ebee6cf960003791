"""Markdown tables: the one writer for the evaluate report, the benchmarks and the AOT tables.

Standard library only (trainer/aot.py, launch/ and benchmarks/device.py's bare GPU host import
it). A `|` inside a cell is written as `\\|`, so a cell such as an error message cannot split a row.
"""

from __future__ import annotations

from typing import Any, Sequence


def cell(value: Any) -> str:
    """`value` as one table cell: `str(value)` with every `|` escaped as `\\|`."""
    return str(value).replace("|", "\\|")


def row(values: Sequence[Any], widths: Sequence[int] | None = None) -> str:
    """One table line; with `widths`, each cell right-aligned to its column's width."""
    cells = [cell(v) for v in values]
    if widths is not None:
        cells = [c.rjust(w) for c, w in zip(cells, widths)]
    return "| " + " | ".join(cells) + " |"


def separator(widths: Sequence[int]) -> str:
    """The line under the header: one dash per character of each padded column."""
    return "|" + "|".join("-" * (w + 2) for w in widths) + "|"


def header(headers: Sequence[Any], widths: Sequence[int] | None = None) -> str:
    """The header line and the separator under it; `widths=None`: unpadded (`|---|` per column)."""
    under = separator(widths) if widths is not None else "|" + "---|" * len(headers)
    return row(headers, widths) + "\n" + under


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], *, align: bool = True) -> str:
    """A Markdown table; `align`: every column right-aligned to its widest cell (readable as plain
    text, e.g. a benchmark's stdout), else cells unpadded (the report's report.md)."""
    widths = None
    if align:
        widths = [
            max([len(cell(h))] + [len(cell(r[i])) for r in rows]) for i, h in enumerate(headers)
        ]
    return "\n".join([header(headers, widths)] + [row(r, widths) for r in rows])
