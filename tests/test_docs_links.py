"""Every relative link in the README and in docs/ leads to a file of this
repository, and every #anchor to a heading of its target (issue 16: the docs
live inside the project)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings."""
    text = FENCE.sub("", path.read_text())
    found = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            found.add(slug)
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_the_docs_are_there():
    names = {p.name for p in documents()}
    assert {"README.md", "architecture.md", "admin-guide.md", "user-guide.md"} <= names, names
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/architecture.md", "docs/admin-guide.md", "docs/user-guide.md"):
        assert f"]({doc})" in readme, f"the README does not link {doc}"


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    checked = 0
    for doc in documents():
        for target in links(doc):
            if re.match(r"[a-z]+:", target):   # http:, https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{where} leaves the repository")
            elif not dest.exists():
                broken.append(f"{where} names no file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading makes #{anchor} in {dest.relative_to(ROOT)}")
    assert checked >= 10, f"only {checked} relative links found: is the link pattern right?"
    assert not broken, "\n".join(broken)


def test_the_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nowhere)\n```\n[in code](nowhere.md)\n```\n")
    assert links(page) == ["#title", "#nowhere"]
    assert "title" in anchors(page) and "nowhere" not in anchors(page)
