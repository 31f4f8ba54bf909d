"""The README stays true: its Python blocks run, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = python_blocks(README)
    assert blocks, "the README should show the library in use"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(bash_blocks) >= 2, "the README opens with the main-job and test commands"
    assert ci.strip() == bash_blocks[1].strip()
    assert "pytest" in ci
