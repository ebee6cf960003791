"""Reading the markdown tables the benchmark scripts print (shared by their smoke tests)."""
import math


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in `text`: [table][row][cell], header first, separator dropped."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def number(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value), cell
    return value
