"""The README and the docs/ pages: every relative link and picture points at a file that exists, and every
#anchor at a heading of the page it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def headings(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in headings(target):
            broken.append(f"{link}: no heading '{anchor}' in {target.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = links(ROOT / "README.md")
    unlinked = [p.name for p in PAGES[1:] if not any(link.partition("#")[0] == f"docs/{p.name}" for link in readme)]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_the_readmes_exercise_table_lists_the_registry_in_order():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from make_exercises import EXERCISES

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| `(\w+)` \| [^|]*`(?:[^`|]*)`[^|]*\|", text, flags=re.M)
    listed = [name for _, name in rows]
    assert listed == list(EXERCISES), "the README's exercise table and tools/make_exercises.py's EXERCISES differ"
    days = {"transformer.py": "1", "llama.py": "2", "llama_generation.py": "2"}
    assert [day for day, _ in rows] == [days[EXERCISES[name][0]] for name in listed]
