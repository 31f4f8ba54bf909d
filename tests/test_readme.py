"""The README and the docs stay true: their Python blocks run, and CI runs the README's test command.

Every ```python block of README.md and of each page in docs/ runs, one block at a time. A block that
is not meant to run (a sketch that needs your own model, a shell session, a file's content) is an
indented block or a ```bash / ```text one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_blocks(text: str, name: str) -> None:
    for block in python_blocks(text):
        exec(compile(block, name, "exec"), {"__name__": "docs"})


def test_readme_python_blocks_run():
    assert python_blocks(README), "the README should show the library in use"
    run_blocks(README, "README.md")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_python_blocks_run(page):
    try:
        run_blocks(page.read_text(), f"docs/{page.name}")
    except ModuleNotFoundError as e:  # a page about an optional extra (megatron, trl) without it
        if (e.name or "smar").split(".")[0] == "smar":
            raise
        pytest.skip(f"docs/{page.name} needs {e.name}, not installed")


def test_docs_pages_are_linked_from_the_readme():
    """Every page is reachable from the README, and every docs/ link of the README has its page."""
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)", README))
    assert {p.name for p in PAGES} <= linked
    assert all((ROOT / "docs" / name).exists() for name in linked)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_to_docs_pages_and_anchors_resolve():
    """Links between the README and the pages, and the modules' citations of docs/*.md#anchor,
    name a page that exists and a heading it has."""
    sources = [ROOT / "README.md", *PAGES, *sorted((ROOT / "smar").rglob("*.py"))]
    for source in sources:
        text = source.read_text()
        base = source.parent if source.suffix == ".md" else ROOT
        # a markdown link in a page, a docs/ path in a module's docstring or comment
        link = r"\]\(" if source.suffix == ".md" else r"\b(?=docs/)"
        for target, anchor in re.findall(link + r"((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?", text):
            page = base / target
            assert page.exists(), f"{source.relative_to(ROOT)} links to {target}"
            if anchor:
                assert anchor in _anchors(page), f"{source.relative_to(ROOT)}: {target}#{anchor}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(bash_blocks) >= 2, "the README opens with the main-job and test commands"
    assert ci.strip() == bash_blocks[1].strip()
    assert "pytest" in ci
