"""Citations of the project's documents never rot.

A docstring or comment in translators/, agent/, bench/, tests/ or netns-tests/
that names a Markdown file must name one that exists, relative to the
repository root (the docs/ prefix included), and every section it cites after
a section sign must be a heading of that file:

    docs/semantics.md §State
    docs/design.md §"Command line"
    docs/semantics.md §State, §Limits and §"API behaviours"

A section is a quoted heading, or else the longest heading that the text after
the section sign starts with. The documents in docs/ are held to the same rule
for their Markdown links to each other, and there a section sign that follows
no link cites a heading of the same document. In code, a section sign that
follows no document is an error.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_DIRS = ("translators", "agent", "bench", "tests", "netns-tests")

# A Markdown link to a document, or a bare path ending in .md.
_CITATION = re.compile(
    r"\[[^\]]*\]\((?P<link>[^)#\s]+\.md)(?:#[^)]*)?\)|(?<![\w/.-])(?P<path>[\w./-]*\w\.md)\b"
)
# What may stand between a document (or a section) and the next section sign.
_BEFORE_SECTION = re.compile(r"(?:\s*,\s*|\s+and\s+|\s*;\s*|\s*)§")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Text:
    """One docstring, comment block or document, whitespace collapsed."""

    where: str  # file:line
    body: str
    base: Path  # the directory cited paths are relative to
    own: Path | None = None  # the document itself: a bare section sign cites its headings


def _collapse(text: str) -> str:
    return " ".join(text.split())


def headings(path: Path) -> set[str]:
    """Every heading of a Markdown file, outside fenced code blocks."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            found.add(_collapse(match["title"]))
    return found


def _section_at(body: str, pos: int, titles: set[str]) -> tuple[str | None, str, int]:
    """(the heading cited at `pos`, or None; the text cited; where the citation ends)."""
    if body.startswith('"', pos):
        end = body.find('"', pos + 1)
        end = len(body) if end < 0 else end
        cited = body[pos + 1 : end]
        return (cited if cited in titles else None), cited, end + 1
    best: str | None = None
    for title in titles:
        after = pos + len(title)
        if body.startswith(title, pos) and (after == len(body) or not body[after].isalnum()):
            if best is None or len(title) > len(best):
                best = title
    if best is not None:
        return best, best, pos + len(best)
    word = re.match(r"[^\s,;:.)\"]*", body[pos:])
    cited = word.group(0) if word else ""
    return None, cited, pos + len(cited)


def problems(text: Text) -> list[str]:
    """What is wrong with the citations in one text (empty when all of them hold)."""
    out: list[str] = []
    used: set[int] = set()  # positions of the section signs of citations
    for match in _CITATION.finditer(text.body):
        cited = match["link"] or match["path"]
        target = (text.base / cited).resolve()
        if not target.is_file():
            hint = " (cite it as docs/...)" if (DOCS / Path(cited).name).is_file() else ""
            out.append(f"{text.where}: {cited} does not exist{hint}")
            continue
        titles = headings(target)
        pos = match.end()
        while (sep := _BEFORE_SECTION.match(text.body, pos)) is not None:
            used.add(sep.end() - 1)
            title, shown, pos = _section_at(text.body, sep.end(), titles)
            if title is None:
                out.append(f"{text.where}: {cited} has no section {shown!r}")
    own = headings(text.own) if text.own is not None else None
    for pos, char in enumerate(text.body):
        if char != "§" or pos in used:
            continue
        if own is None:
            out.append(f"{text.where}: § without a document before it: {text.body[pos:][:40]!r}")
        elif _section_at(text.body, pos + 1, own)[0] is None:
            shown = _section_at(text.body, pos + 1, own)[1]
            out.append(f"{text.where}: no section {shown!r} in this document")
    return out


def code_texts(path: Path) -> list[Text]:
    """The docstrings and comment blocks (consecutive comment lines) of one module."""
    source = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    texts: list[Text] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                line = node.body[0].lineno
                texts.append(Text(f"{name}:{line}", _collapse(doc), ROOT))
    block: list[str] = []
    start = last = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        if block and line != last + 1:
            texts.append(Text(f"{name}:{start}", _collapse(" ".join(block)), ROOT))
            block = []
        if not block:
            start = line
        block.append(token.string.lstrip("#"))
        last = line
    if block:
        texts.append(Text(f"{name}:{start}", _collapse(" ".join(block)), ROOT))
    return texts


def _modules() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_there_is_something_to_check() -> None:
    assert {"semantics.md", "design.md", "kernel-notes.md"} <= {p.name for p in DOCS.glob("*.md")}
    cited = [t for p in _modules() for t in code_texts(p) if "docs/" in t.body]
    assert len(cited) >= 20


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_cites_documents_and_sections_that_exist(path: Path) -> None:
    found = [problem for text in code_texts(path) for problem in problems(text)]
    assert found == []


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_documents_cite_each_other_by_sections_that_exist(path: Path) -> None:
    text = Text(path.relative_to(ROOT).as_posix(), _collapse(path.read_text()), DOCS, path)
    assert problems(text) == []


def test_a_rotten_citation_is_found() -> None:
    def check(body: str) -> list[str]:
        return problems(Text("x.py:1", body, ROOT))

    assert check('see docs/semantics.md §State, §Limits and §"API behaviours".') == []
    assert check("docs/semantics.md §Decisions where Alibaba's documents are silent") != []
    assert check("docs/semantics.md §Stat") != []
    assert check('docs/design.md §"Command lines"') != []
    assert check("semantics.md §State") != []  # not relative to the root
    assert check("docs/nowhere.md") != []
    assert check("design §5") != []  # a section of no document
