"""The README is the front door: short, the two set-up commands first, and every link behind it resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose target does not exist (web addresses and anchors are skipped)."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def test_readme_fits_on_a_few_screens():
    size = len(README.read_text())
    assert size < 10_000, f"README.md has {size} characters; move detail into docs/"


def test_the_two_commands_are_the_first_code_block():
    first_block = re.search(r"```[a-z]*\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(t.split("#")[0]).name for t in LINK.findall(README.read_text()) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages not linked from README.md: {sorted(pages - linked)}"


def test_every_relative_link_resolves():
    problems = {page.name: broken_links(page) for page in markdown_pages()}
    assert not any(problems.values()), problems


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[ok](there.md) [web](https://example.org) [anchor](#top) [gone](missing.md#part)")
    assert broken_links(page) == ["missing.md#part"]
