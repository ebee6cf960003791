"""trainer/markdown.py, the one Markdown table writer: a `|` inside a cell is escaped and the cell
reads back whole through tests/md_tables.py; aligned and unpadded tables."""

from md_tables import tables

from trainer import markdown


def test_a_pipe_in_a_cell_is_escaped_and_round_trips():
    headers = ["variant", "fits | why"]
    rows = [["xla", "**no** (RESOURCE_EXHAUSTED: a|b)"], ["collective", 1.5]]
    for align in (True, False):
        text = markdown.table(headers, rows, align=align)
        assert "a\\|b" in text and "fits \\| why" in text
        assert all(line.count("|") - line.count("\\|") == 3 for line in text.splitlines())
        assert tables(text) == [[headers, [str(c) for c in rows[0]], ["collective", "1.5"]]]


def test_aligned_and_unpadded_layouts():
    assert markdown.table(["a", "long"], [[1, 2], [333, 4]]) == (
        "|   a | long |\n|-----|------|\n|   1 |    2 |\n| 333 |    4 |"
    )
    assert markdown.table(["a", "b"], [["x", ""]], align=False) == "| a | b |\n|---|---|\n| x |  |"
    widths = [len("width"), len("ms")]
    assert markdown.header(["width", "ms"], widths) + "\n" + markdown.row([64, "15"], widths) == (
        "| width | ms |\n|-------|----|\n|    64 | 15 |"
    )
