"""Cross-references: every place the code or the docs send a reader to a section of the README or
of a docs/ file, or to a function of the code, names something that exists.

Sources: every *.py file at the root and in tests/ (this file, whose examples are not references,
left out), every cell of kl_proof.ipynb, README.md and docs/*.md.

1. Citations. The word README, a comma (or README's) and a quoted section name; or a
   docs/<file>.md path (also as a markdown link, [docs/x.md](docs/x.md)), a comma and a quoted
   section name. The quote may start on the next line, and a double-quoted name may wrap onto the
   next lines (a comment's # there is skipped). It resolves when the named file has exactly one
   heading (#, ##, ... at any level, outside fenced code blocks) whose text is the quoted name,
   or else exactly one whose text is, once its trailing parenthesised notes are dropped: "Noise
   level: ODE vs SDE rollouts" names "Noise level: ODE vs SDE rollouts (`--only noise`, ~30
   min)"; a name that fits two headings ("The shipped teachers") is ambiguous: quote one whole.
   Compared case-insensitively, markdown's * and ` and trailing punctuation ignored. A markdown
   link to a .md file, [text](path.md#anchor), names a file that exists (the path relative to the
   linking file), and its #anchor, if any, one of that file's headings' GitHub anchors.
2. Pointers into the lab log name a section. docs/experiments.md is long: every mention of it in
   the code, the notebook, README or docs/ is a citation of one of its sections (rule 1) or a
   link with an #anchor. The one exception: tests/, whose mentions are of the file as a whole
   (they check its tables).
3. Names. Every `module.name` in a comment or string of the code (f-strings' {fields} left out:
   they are code), in the notebook and in the markdown, where module is one of the project's
   top-level modules (MODULES), names something module.py defines, found by ast without
   importing anything: a def, class, assignment or import at its top level (also inside if /
   try / with). A dotted rest names a class's attribute: a def or assignment in its body, a
   self.<name> assignment in its methods, or either in a base class defined in the same module.
   module.py, module.json, ... are file names, not names (FILE_EXT).
"""
import ast
import io
import json
import re
import tokenize
from pathlib import Path
from typing import NamedTuple

from conftest import REPO

MODULES = ("sampler", "rewards", "teachers", "distill", "evaluate", "runs", "toy", "real_rewards",
           "experiments", "ablations", "multitask", "bench_distill", "gpu_check")
FILE_EXT = {"py", "md", "json", "jsonl", "png", "ipynb", "txt", "pt", "safetensors", "csv", "log", "sh"}
LAB_LOG = "docs/experiments.md"
EXEMPT_FROM_SECTIONS = ("tests/",)      # rule 2: tests name docs/experiments.md as a whole (its tables)

# README, "X" | README, 'X' | README's "X" | docs/<file>.md, "X" | [docs/<file>.md](link), "X"
# (whitespace, a newline included, after the comma; a double-quoted name may wrap: at most 200 characters)
CITATION = re.compile(r"""(README(?:'s)?|docs/[\w.-]+\.md)(\]\([^)\s]*\))?(?:,|(?<='s))\s+(?:#\s+)?"""
                      r"""(?:"([^"]{1,200})"|'([^'\n]{1,200})')""")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s#]*)(?:#([^)\s]*))?\)")               # [text](target#anchor)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
NOTE = re.compile(r"^(.*?\S)\s*(?:\*\([^()]*\)\*|\([^()]*\))$")                  # a trailing (note) or *(note)*
LAB_LOG_MENTION = re.compile(r"(?<![\w/.-])(?:docs/)?experiments\.md\b")


class Source(NamedTuple):
    where: str             # a path relative to the repository, or the notebook's cell
    text: str
    kind: str              # "py": a module or test; "md": README, docs/, a notebook markdown cell;
                           # "code": a notebook code cell
    folder: Path           # what the source's relative links start from


class Heading(NamedTuple):
    line: int
    full: str              # normalised text
    short: str             # normalised text without trailing (notes)
    anchor: str            # GitHub's anchor


def _norm(text: str) -> str:
    text = re.sub(r"\s+", " ", re.sub(r"[*`]", "", text))
    return text.strip().rstrip(".,:;!?").strip().casefold()


def _quoted(text: str) -> str:
    """A quoted section name as one line: a wrapped quote's line breaks (and a comment's #) are spaces."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)


def headings_of(markdown: str) -> list[Heading]:
    """Every ATX heading of a markdown text, fenced code blocks skipped."""
    out, fenced, seen = [], False, {}
    for i, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            text = short = m.group(2)
            while n := NOTE.match(short):
                short = n.group(1)
            slug = re.sub(r"[^\w\- ]", "", re.sub(r"[*`]", "", text).strip().lower()).replace(" ", "-")
            k = seen[slug] = seen.get(slug, -1) + 1
            out.append(Heading(i, _norm(text), _norm(short), slug if k == 0 else f"{slug}-{k}"))
    return out


def resolve(section: str, heads: list[Heading]) -> str | None:
    """None where the quoted section names exactly one heading (whole, or else without its notes),
    else why not."""
    s = _norm(_quoted(section))
    for field in ("full", "short"):
        lines = sorted({h.line for h in heads if getattr(h, field) == s})
        if len(lines) == 1:
            return None
        if len(lines) > 1:
            return f"names {len(lines)} headings (lines {lines}): quote one whole"
    return "names no heading"


def sources() -> list[Source]:
    """Every .py file at the root and in tests/ (this file left out), every cell of kl_proof.ipynb,
    README.md and docs/*.md."""
    me = Path(__file__).resolve()
    files = sorted(p for p in [*REPO.glob("*.py"), *REPO.glob("tests/*.py")] if p.resolve() != me)
    out = [Source(str(p.relative_to(REPO)), p.read_text(), "py", p.parent) for p in files]
    nb = REPO / "kl_proof.ipynb"
    if nb.is_file():
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            kind = "md" if cell["cell_type"] == "markdown" else "code"
            out.append(Source(f"kl_proof.ipynb cell {i} ({cell['cell_type']})", src, kind, REPO))
    for p in [REPO / "README.md", *sorted(REPO.glob("docs/*.md"))]:
        out.append(Source(str(p.relative_to(REPO)), p.read_text(), "md", p.parent))
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def broken_citations(srcs: list[Source], heads_of) -> tuple[int, list[str]]:
    """(citations found, what is wrong) under rules 1 and 2; heads_of(repo-relative .md path) gives
    that file's headings, None where it does not exist."""
    n, broken = 0, []
    for src in srcs:
        covered = []                                    # spans that cite a section (rule 2), rightly or not
        for m in CITATION.finditer(src.text):
            n += 1
            doc = "README.md" if m.group(1).startswith("README") else m.group(1)
            section = m.group(3) or m.group(4)
            heads, at = heads_of(doc), f"{src.where}:{_line(src.text, m.start())}"
            covered.append(m.span())
            if re.search(r"\n\s*\n", section):
                broken.append(f"{at}: {doc}'s quoted section runs over a blank line: close the quote")
            elif heads is None:
                broken.append(f"{at}: {doc} does not exist (cited for {_quoted(section)!r})")
            elif why := resolve(section, heads):
                broken.append(f"{at}: {doc}, {_quoted(section)!r} {why}")
        for m in LINK.finditer(src.text):                       # links to markdown files, and their anchors
            target, anchor = m.group(1), m.group(2)
            if not (target.endswith(".md") or (not target and anchor is not None)):
                continue                                        # an image, a web page, ...
            n += 1
            if target:
                path = (src.folder / target).resolve()
                doc = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else target
            else:                                               # [text](#anchor): the source's own file
                doc = src.where
            heads, at = heads_of(doc), f"{src.where}:{_line(src.text, m.start())}"
            if anchor is not None:
                covered.append(m.span())
            if heads is None:
                broken.append(f"{at}: the link to {target or '#' + anchor} names no file")
            elif anchor is not None and anchor not in {h.anchor for h in heads}:
                broken.append(f"{at}: {doc} has no heading with the anchor #{anchor}")
        if src.where.startswith(EXEMPT_FROM_SECTIONS):
            continue
        for m in LAB_LOG_MENTION.finditer(src.text):
            if not any(a <= m.start() < b for a, b in covered):
                broken.append(f"{src.where}:{_line(src.text, m.start())}: {m.group(0)} names no section: "
                              f"write {LAB_LOG}, \"<its heading>\"")
    return n, broken


def _code_text(src: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and string of Python source, f-strings' {fields} blanked."""
    out = []
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.STRING:
            s = t.string
            if "f" in s[:s.index(s[-1])].lower():               # the prefix holds f: {fields} are code
                s = re.sub(r"\{[^{}]*\}", "{}", s)
            out.append((t.start[0], s))
        elif t.type == tokenize.COMMENT:
            out.append((t.start[0], t.string))
    return out


def prose(srcs: list[Source]) -> list[tuple[str, int, str]]:
    """(where, first line, text): the comments and strings of the code, the markdown whole."""
    out = []
    for src in srcs:
        pieces = [(1, src.text)]
        if src.kind in ("py", "code"):
            try:
                pieces = _code_text(src.text)
            except (tokenize.TokenError, SyntaxError, IndentationError):
                pass                                            # e.g. a notebook cell with a %magic: all of it
        out += [(src.where, line, text) for line, text in pieces]
    return out


def _scope(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a block of statements defines: defs, classes, assignments, imports (also in if /
    try / with)."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out |= {n.id: node for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                out = _scope(block) | out
    return out


def _class_scope(cls: ast.ClassDef, module: dict[str, ast.AST]) -> dict[str, ast.AST]:
    """A class's attributes: its body's names, self.<name> assignments in its methods, its bases'
    (those defined in the same module)."""
    out = {}
    for base in cls.bases:
        parent = module.get(base.id) if isinstance(base, ast.Name) else None
        if isinstance(parent, ast.ClassDef) and parent is not cls:
            out |= _class_scope(parent, module)
    for fn in cls.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                if (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                        and isinstance(n.value, ast.Name) and n.value.id == "self"):
                    out[n.attr] = n
    return out | _scope(cls.body)


def unresolved(mod: str, dotted: str, trees: dict[str, ast.Module]) -> str | None:
    """None where module `mod` defines `dotted` (see the module docstring, rule 3), else why not."""
    if trees.get(mod) is None:
        return f"{mod}.py does not exist"
    top = _scope(trees[mod].body)
    scope, path = top, mod
    for part in dotted.split("."):
        if scope is None:
            return f"{path} is not a class: its attribute {part} cannot be checked"
        if part not in scope:
            return f"{path} has no {part}"
        node, path = scope[part], f"{path}.{part}"
        scope = _class_scope(node, top) if isinstance(node, ast.ClassDef) else None
    return None


def mentions(pieces: list[tuple[str, int, str]], modules) -> list[tuple[str, int, str, str]]:
    """(where, line, module, dotted name) for every `module.name` mention, file names left out."""
    pat = re.compile(r"(?<![\w./-])(%s)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)" % "|".join(map(re.escape, modules)))
    return [(where, line + text.count("\n", 0, m.start()), m.group(1), m.group(2))
            for where, line, text in pieces for m in pat.finditer(text)
            if m.group(2).split(".")[0] not in FILE_EXT]


def _trees() -> dict[str, ast.Module | None]:
    files = {m: REPO / f"{m}.py" for m in MODULES}
    return {m: ast.parse(f.read_text()) if f.is_file() else None for m, f in files.items()}


def _repo_headings():
    cache = {}

    def heads_of(doc: str):
        if doc not in cache:
            md = REPO / doc
            cache[doc] = headings_of(md.read_text()) if md.is_file() else None
        return cache[doc]
    return heads_of


def test_the_citation_pattern():
    """The pattern finds each citation form (also wrapped onto the next lines) and nothing else."""
    text = ('see (README, "Run folders") and README\'s "Results", (README,\n    \'Real scale\'),\n'
            'docs/formats.md, "Errors"; not README "Quickstart", not the README\'s tables, not docs/formats.md;\n'
            '[docs/experiments.md](docs/experiments.md), "Stage 2\n    # (distillation)"')
    got = [(m.group(1), _quoted(m.group(3) or m.group(4))) for m in CITATION.finditer(text)]
    assert got == [("README", "Run folders"), ("README's", "Results"), ("README", "Real scale"),
                   ("docs/formats.md", "Errors"), ("docs/experiments.md", "Stage 2 (distillation)")], got


def test_each_broken_reference_is_caught():
    """On synthetic text: a stale heading, an ambiguous one, a missing file, a pointer into the lab
    log without a section, a stale anchor, a stale `module.name` - each is reported, and what is
    right is not."""
    log = "# Log\n## Stage 2 (distillation)\n### The shipped teachers\n## Stage 1\n### The shipped teachers\n"
    fmt = "# Formats\n## Results JSON *(earlier protocol)*\n```\n# a comment, not a heading\n```\n"
    docs = {LAB_LOG: headings_of(log), "docs/formats.md": headings_of(fmt),
            "README.md": headings_of("# R\n## Results\n")}
    good = ('README, "Results"; README\'s "results." docs/formats.md, "Results JSON"; docs/formats.md,\n'
            '"results json *(earlier protocol)*"; docs/experiments.md, "Stage 2"; (docs/experiments.md,\n'
            '    # "Stage 2 (distillation)"); [log](docs/experiments.md#stage-1),\n'
            '[docs/experiments.md](docs/experiments.md), "Stage 1"')
    bad = ('README, "Differences from the paper"; docs/formats.md, "a comment, not a heading"; docs/gone.md,\n'
           '"Results"; docs/experiments.md, "The shipped teachers"; see docs/experiments.md for more;\n'
           '[log](docs/experiments.md#stage-3); [docs/experiments.md](docs/experiments.md)')
    ok = [Source("a.py", good, "py", REPO), Source("a.md", good.replace("    # ", ""), "md", REPO),
          Source("tests/t.py", "docs/experiments.md's tables", "py", REPO / "tests")]
    n, broken = broken_citations(ok, docs.get)
    assert n == 18 and broken == [], broken
    n, broken = broken_citations([Source("b.md", bad, "md", REPO)], docs.get)
    assert [b.split(": ", 1)[1] for b in broken] == [
        "README.md, 'Differences from the paper' names no heading",
        "docs/formats.md, 'a comment, not a heading' names no heading",
        "docs/gone.md does not exist (cited for 'Results')",
        "docs/experiments.md, 'The shipped teachers' names 2 headings (lines [3, 5]): quote one whole",
        "docs/experiments.md has no heading with the anchor #stage-3",
    ] + ["docs/experiments.md names no section: write docs/experiments.md, \"<its heading>\""] * 3, broken
    # ("see ... for more", the bare link's text and its target)

    mod = ast.parse("import torch\nN = 3\nif True:\n    M: int = 1\ndef f(): pass\nclass C:\n    x = 1\n"
                    "    def m(self):\n        self.y = 2\nclass D(C):\n    pass\n")
    code = ('"""m.f, m.N, m.M, m.torch, m.C.x, m.C.m, m.C.y, m.D.x, m.D.y;\n'
            'not names: m.py, m.json, docs/m.md, x.m.g, runs.m.g"""\n'
            'x = f"{m.gone}"   # m.g, m.C.z, m.N.real\n')
    found = mentions(prose([Source("a.py", code, "py", REPO)]), ["m"])
    assert [(line, f"{mm}.{d}") for _, line, mm, d in found] == [
        (1, "m.f"), (1, "m.N"), (1, "m.M"), (1, "m.torch"), (1, "m.C.x"), (1, "m.C.m"), (1, "m.C.y"),
        (1, "m.D.x"), (1, "m.D.y"), (3, "m.g"), (3, "m.C.z"), (3, "m.N.real")], found
    assert [unresolved(mm, d, {"m": mod}) for _, _, mm, d in found] == [None] * 9 + [
        "m has no g", "m.C has no z", "m.N is not a class: its attribute real cannot be checked"]
    assert unresolved("gone", "f", {"m": mod}) == "gone.py does not exist"


def test_citations_and_lab_log_pointers_resolve():
    """Every README / docs citation and markdown link in the code and docs names a heading of that
    file, and every pointer into docs/experiments.md names a section (rules 1 and 2)."""
    n, broken = broken_citations(sources(), _repo_headings())
    assert n >= 20, f"only {n} citations found: is the pattern still right?"
    assert not broken, f"{len(broken)} of {n} references name no existing section:\n" + "\n".join(broken)


def test_module_names_resolve():
    """Every `module.name` in the code's comments and strings, the notebook, README and docs/ names
    something that module defines (rule 3)."""
    found, trees = mentions(prose(sources()), MODULES), _trees()
    assert len(found) >= 50, f"only {len(found)} module.name mentions found: is the pattern still right?"
    broken = [f"{where}:{line}: {mod}.{name}: {why}" for where, line, mod, name in found
              if (why := unresolved(mod, name, trees))]
    assert not broken, f"{len(broken)} of {len(found)} module.name mentions are stale:\n" + "\n".join(broken)
