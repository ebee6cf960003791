"""Reading the markdown tables the benchmark scripts print (shared by their smoke tests)."""

import math
import re


def cells(line: str) -> list[str]:
    """The cells of one table line; `\\|` (trainer/markdown.py's escape) is a `|` inside a cell."""
    inner = line.strip()[1:]
    if inner.endswith("|") and not inner.endswith("\\|"):
        inner = inner[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in `text`: [table][row][cell], header first, separator dropped."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append(cells(line))
        elif current:
            found.append(current)
            current = []
    return found


def number(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value), cell
    return value
