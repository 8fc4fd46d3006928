"""Cross-references: every place the code sends a reader to a section of the README or of a docs/
file names a section that exists.

A citation is the word README, a comma (or README's) and a quoted section name, or a docs/<file>.md
path, a comma and a quoted section name, in any *.py file of the repository (its root and tests/)
or any cell of kl_proof.ipynb, also where the quote wraps onto the next line (this file's own
examples excepted). It resolves when the
named markdown file has a heading (#, ##, ... at any level, outside fenced code blocks) whose text
equals the quoted name case-insensitively, trailing punctuation ignored on both sides.
"""
import json
import re
from pathlib import Path

from conftest import REPO

# README, "X" | README, 'X' | README's "X" | docs/<file>.md, "X" (whitespace, a newline included, after the comma)
CITATION = re.compile(r"""(README(?:'s)?|docs/[\w.-]+\.md)(?:,|(?<='s))\s+(?:"([^"\n]+)"|'([^'\n]+)')""")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _norm(text: str) -> str:
    return text.strip().rstrip(".,:;!?").strip().casefold()


def headings(md: Path) -> set[str]:
    """The normalised text of every ATX heading of a markdown file, fenced code blocks skipped."""
    out, fenced = set(), False
    for line in md.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.add(_norm(m.group(2)))
    return out


def sources() -> list[tuple[str, str]]:
    """(where, text): every .py file at the root and in tests/ (this file, whose examples are not
    citations, left out), and every cell of kl_proof.ipynb."""
    files = sorted(p for p in [*REPO.glob("*.py"), *REPO.glob("tests/*.py")] if p.resolve() != Path(__file__).resolve())
    out = [(str(p.relative_to(REPO)), p.read_text()) for p in files]
    nb = REPO / "kl_proof.ipynb"
    if nb.is_file():
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            out.append((f"kl_proof.ipynb cell {i} ({cell['cell_type']})", src))
    return out


def citations() -> list[tuple[str, int, str, str]]:
    """(where, line, markdown file, section) for every citation found."""
    found = []
    for where, text in sources():
        for m in CITATION.finditer(text):
            doc = "README.md" if m.group(1).startswith("README") else m.group(1)
            found.append((where, text.count("\n", 0, m.start()) + 1, doc, m.group(2) or m.group(3)))
    return found


def test_the_citation_pattern():
    """The pattern finds each citation form (also wrapped onto the next line) and nothing else."""
    text = ('see (README, "Run folders") and README\'s "Results", (README,\n    \'Real scale\'),\n'
            'docs/formats.md, "Errors"; not README "Quickstart", not the README\'s tables, not docs/formats.md')
    got = [(m.group(1), m.group(2) or m.group(3)) for m in CITATION.finditer(text)]
    assert got == [("README", "Run folders"), ("README's", "Results"), ("README", "Real scale"),
                   ("docs/formats.md", "Errors")], got


def test_citations_name_existing_headings():
    """Every README / docs citation in the code names a heading of that file (see the module docstring)."""
    found = citations()
    assert len(found) >= 10, f"only {len(found)} citations found: is the pattern still right? {found}"
    cache, broken = {}, []
    for where, line, doc, section in found:
        md = REPO / doc
        if doc not in cache:
            cache[doc] = headings(md) if md.is_file() else None
        if cache[doc] is None:
            broken.append(f"{where}:{line}: {doc} does not exist (cited for {section!r})")
        elif _norm(section) not in cache[doc]:
            broken.append(f"{where}:{line}: {doc} has no heading {section!r}")
    assert not broken, f"{len(broken)} of {len(found)} citations name no existing section:\n" + "\n".join(broken)
