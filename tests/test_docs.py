"""The repo documents itself: code and docs cite only files inside it, and every `docs/DESIGN.md §N`
they cite exists. Reads text files only (no JAX), so it runs in well under a second."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"
SUFFIXES = (".py", ".md", ".sh", ".toml", ".txt", ".cfg")
NAMES = ("Makefile",)
SKIP_DIRS = {".venv", ".git", "workdir", "build", "node_modules", "__pycache__"}

# Built from pieces, so this file does not cite them itself.
OUTSIDE = ("../" + "shared", "REFERENCE" + ".md", "shared/" + "DESIGN")
CITE = re.compile(r"(?:(docs/)?DESIGN\.md|DESIGN) §(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.M)


def _files() -> list[Path]:
    """Tracked and untracked-but-not-ignored text files (git), else a walk of the repo."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        paths = [REPO / line for line in out if line]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    return sorted(
        p
        for p in paths
        if p.is_file()
        and not SKIP_DIRS & set(p.relative_to(REPO).parts)
        and (p.suffix in SUFFIXES or p.name in NAMES)
    )


def _sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text()))


def test_design_keeps_the_section_numbers_code_cites():
    sections = _sections()
    assert {str(n) for n in range(1, 9)} <= sections, sorted(sections)


def test_nothing_cites_a_file_outside_the_repo():
    bad = []
    for path in _files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for needle in OUTSIDE:
                if needle in line:
                    bad.append(f"{path.relative_to(REPO)}:{number}: cites {needle}")
    assert not bad, "\n".join(bad)


def test_every_design_citation_names_the_file_and_an_existing_section():
    sections = _sections()
    bad = []
    for path in _files():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for match in CITE.finditer(line):
                prefix, section = match.group(1), match.group(2)
                named = prefix or (
                    match.group(0).startswith("DESIGN.md") and rel.startswith("docs/")
                )
                if not named:
                    bad.append(
                        f"{rel}:{number}: {match.group(0)!r}: write docs/DESIGN.md §{section}"
                    )
                elif section not in sections:
                    bad.append(
                        f"{rel}:{number}: {match.group(0)!r}: docs/DESIGN.md has no §{section}"
                    )
    # docs/DESIGN.md's own cross-references (bare `§N`) must resolve too.
    for number, line in enumerate(DESIGN.read_text().splitlines(), 1):
        for section in re.findall(r"§(\d+(?:\.\d+)?)", line):
            if section not in sections:
                bad.append(f"docs/DESIGN.md:{number}: §{section} does not exist")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for():
    """The patterns match the citations they exist to catch (a test of the test's regexes)."""
    section = "\N{SECTION SIGN}"
    assert CITE.search(f"see DESIGN {section}6").group(1) is None
    assert CITE.search(f"(docs/DESIGN.md {section}2.5)").groups() == ("docs/", "2.5")
    assert HEADING.findall("## 2. The stage DAG\n### 2.5 Cache key\n") == ["2", "2.5"]
    assert all(needle in f"{needle}/x" for needle in OUTSIDE)
