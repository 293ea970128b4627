"""Citations of ``docs/methods.md`` resolve, and they all use the one form that page documents.

The form (``docs/methods.md`` "How to cite this page"): ``docs/methods.md §5.2``,
``docs/methods.md §4.1-§4.4``, ``docs/methods.md pitfall 13``; several references share one prefix and are
separated by ", ". Section ids come from headings that start with the number (``### 5.2 ...``), pitfalls from
``### Pitfall 13. ...`` headings of §10.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"

REF = r"(?:§\d+(?:\.\d+)?(?:-§\d+(?:\.\d+)?)?|pitfall \d+)"
CITATION = re.compile(rf"docs/methods\.md (?P<refs>{REF}(?:, {REF})*)(?!\.?\d)")
FILE_NAME = re.compile(r"methods\.md")
# What may follow the file name when a section or pitfall is meant: any of these outside a canonical
# citation is a citation in another form ("methods.md 5.2", "`methods.md` section 5", "methods.md\n§5.2").
REFERENCE_AFTER_FILE = re.compile(r"`?[\s#*]*(?:§|sections?\b|pitfalls?\b|\d)", re.IGNORECASE)
LOOSE_PITFALL = re.compile(r"\bpitfalls?\s+\d", re.IGNORECASE)
SECTION_HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)
PITFALL_HEADING = re.compile(r"^#{2,4} Pitfall (\d+)\. ", re.MULTILINE)

# The numbering of the methods notes that other work cites; it may grow, never change.
EXPECTED_SECTIONS = (
    {str(n) for n in range(14)}
    | {f"1.{n}" for n in range(1, 6)}
    | {f"2.{n}" for n in range(1, 4)}
    | {f"3.{n}" for n in range(1, 6)}
    | {f"4.{n}" for n in range(1, 7)}
    | {f"5.{n}" for n in range(1, 8)}
    | {f"6.{n}" for n in range(1, 5)}
    | {"12.1", "12.2"}
    | {f"13.{n}" for n in range(1, 11)}
)
EXPECTED_PITFALLS = {str(n) for n in range(1, 23)}


@dataclass(frozen=True)
class Finding:
    where: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.text}"


def anchors(markdown: str) -> tuple[set[str], set[str]]:
    """Section ids and pitfall numbers that ``docs/methods.md`` defines through its headings."""
    return set(SECTION_HEADING.findall(markdown)), set(PITFALL_HEADING.findall(markdown))


def split_refs(refs: str) -> list[str]:
    """``"§5.2, §6.1-§6.3, pitfall 12"`` -> ``["§5.2", "§6.1", "§6.3", "pitfall 12"]`` (range ends apart)."""
    out = []
    for ref in refs.split(", "):
        out.extend(ref.split("-") if ref.startswith("§") else [ref])
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _is_link_target(text: str, pos: int) -> bool:
    """``[notes](methods.md)`` or ``[notes](../docs/methods.md#anchor)``: a markdown link to the page."""
    start = text.rfind("(", 0, pos)
    path_before = text[start + 1 : pos]
    return start >= 1 and text[start - 1] == "]" and re.fullmatch(r"[\w./-]*", path_before) is not None


def collect(text: str, where: str) -> tuple[list[Finding], list[Finding]]:
    """(canonical references, citations in any other form) found in ``text``; one finding per reference."""
    refs: list[Finding] = []
    spans = []
    for match in CITATION.finditer(text):
        spans.append(match.span())
        line = _line(text, match.start())
        refs.extend(Finding(where, line, ref) for ref in split_refs(match.group("refs")))

    def canonical(pos: int) -> bool:
        return any(start <= pos < end for start, end in spans)

    loose: list[Finding] = []
    for match in FILE_NAME.finditer(text):
        pos = match.start()
        if canonical(pos - len("docs/")) or _is_link_target(text, pos):
            continue
        snippet = text[max(0, pos - 20) : match.end() + 20].replace("\n", "\\n")
        if text[max(0, pos - 5) : pos] != "docs/":
            message = f"cite the file as docs/methods.md: ...{snippet}..."
            loose.append(Finding(where, _line(text, pos), message))
        elif REFERENCE_AFTER_FILE.match(text, match.end()):
            loose.append(Finding(where, _line(text, pos), f"not the canonical form: ...{snippet}..."))
    for match in LOOSE_PITFALL.finditer(text):
        if not canonical(match.start()):
            snippet = text[max(0, match.start() - 30) : match.end() + 10].replace("\n", "\\n")
            message = f"pitfall without docs/methods.md: ...{snippet}..."
            loose.append(Finding(where, _line(text, match.start()), message))
    return refs, loose


def texts_of(path: Path) -> list[tuple[str, str]]:
    """(label, text) pieces of one file: a notebook gives its cell sources, never its outputs."""
    label = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return [(label, raw)]
    cells = json.loads(raw)["cells"]
    return [(f"{label} cell {i}", "".join(cell["source"])) for i, cell in enumerate(cells)]


def project_files() -> list[Path]:
    """Every file whose citations are checked: package, tests, benchmarks, notebooks, README, docs pages."""
    files = [ROOT / "README.md"]
    for folder in ("zsad", "tests", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    files += sorted(p for p in (ROOT / "docs").glob("*.md") if p != METHODS)
    return [p for p in files if p.is_file() and p != Path(__file__).resolve()]


def check(files: list[Path], markdown: str) -> tuple[list[Finding], list[Finding]]:
    """(references the methods notes do not define, citations in a non-canonical form) over ``files``."""
    sections, pitfalls = anchors(markdown)
    missing: list[Finding] = []
    loose: list[Finding] = []
    for path in files:
        for label, text in texts_of(path):
            refs, bad = collect(text, label)
            loose += bad
            for ref in refs:
                known = pitfalls if ref.text.startswith("pitfall") else sections
                if ref.text.removeprefix("pitfall ").removeprefix("§") not in known:
                    missing.append(ref)
    return missing, loose


def test_methods_notes_keep_the_shared_numbering():
    sections, pitfalls = anchors(METHODS.read_text(encoding="utf-8"))
    assert EXPECTED_SECTIONS - sections == set(), "sections missing from docs/methods.md"
    assert EXPECTED_PITFALLS - pitfalls == set(), "pitfalls missing from docs/methods.md"


def test_methods_notes_cross_references_resolve():
    markdown = METHODS.read_text(encoding="utf-8")
    sections, pitfalls = anchors(markdown)
    body = markdown.split("\n## 0.", 1)[1]  # the citation how-to above shows examples, not references
    cited_sections = set(re.findall(r"§(\d+(?:\.\d+)?)", body))
    cited_pitfalls = set(re.findall(r"\bpitfalls? (\d+)", body))
    assert cited_sections - sections == set()
    assert cited_pitfalls - pitfalls == set()


def test_every_citation_resolves_and_uses_the_canonical_form():
    missing, loose = check(project_files(), METHODS.read_text(encoding="utf-8"))
    assert not missing, "cited but not in docs/methods.md:\n" + "\n".join(map(str, missing))
    assert not loose, "citations not in the form of docs/methods.md:\n" + "\n".join(map(str, loose))


def test_checker_rejects_bogus_and_loose_citations(tmp_path):
    markdown = METHODS.read_text(encoding="utf-8")
    good = tmp_path / "good.py"
    good.write_text('"""Maps (docs/methods.md §5.3, §4.1-§4.4, pitfall 3); see [notes](methods.md)."""\n')
    assert check([good], markdown) == ([], [])

    bogus = tmp_path / "bogus.py"
    bogus.write_text('"""Cites docs/methods.md §5.9 and docs/methods.md §2.1-§2.8, pitfall 23."""\n')
    missing, loose = check([bogus], markdown)
    assert [f.text for f in missing] == ["§5.9", "§2.8", "pitfall 23"] and loose == []

    notebook = tmp_path / "loose.ipynb"
    loose_forms = [
        "methods.md 5.2",
        "`methods.md` section 5",
        "(pitfall 6)",
        "Pitfalls 8, 21",
        "docs/methods.md 5.2",
        "docs/methods.md\n§5.2",
        "`docs/methods.md` §5.2",
        "pitfall 13.7",
    ]
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [form]} for form in loose_forms]
    printed = {"output_type": "stream", "name": "stdout", "text": ["methods.md 5.2\n"]}  # outputs: not read
    code = {"cell_type": "code", "metadata": {}, "source": ["1"], "execution_count": 1, "outputs": [printed]}
    cells.append(code)
    notebook.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    missing, loose = check([notebook], markdown)
    assert missing == []
    assert sorted({f.where for f in loose}) == sorted(f"{notebook} cell {i}" for i in range(len(loose_forms)))
