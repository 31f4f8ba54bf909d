"""The layout is pinned: the library (``smar/``) never imports the testbed (``smar/testbed/``),
``import smar`` needs only torch, no two modules import each other at module level (no import
circle), every module says what it owns and stays small."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import smar

ROOT = Path(smar.__file__).parent
TESTBED = ROOT / "testbed"
LIBRARY = sorted(p for p in ROOT.rglob("*.py") if TESTBED not in p.parents)
EVERY = sorted(ROOT.rglob("*.py"))
MAX_LINES = 400


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_testbed(path):
    if path.name == "cli.py":  # the thin command layer over both packages
        return
    bad = sorted(n for n in _imports(path) if n == "smar.testbed" or n.startswith("smar.testbed."))
    assert not bad, f"{path.name} imports the testbed: {bad}"


def test_the_boundary_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from smar.testbed.model import TinyModel\n")
    assert "smar.testbed.model" in _imports(probe)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The smar modules a file imports when it is imported (statements at module level);
    ``from package import module`` is an edge to the module, not to the package."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in known else node.module)
    return {n for n in names if n in known}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, once each (depth-first search for back edges)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    known = {_module(p) for p in EVERY}
    graph = {_module(p): _top_level_imports(p, known) - {_module(p)} for p in EVERY}
    assert not _circles(graph), _circles(graph)


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("path", EVERY, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns_and_stays_small(path):
    text = path.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{path} has no opening docstring"
    n = len(text.splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines; split it by what it owns"


def test_library_imports_with_testbed_and_extras_unimportable():
    """``import smar`` and every library module but the transformers integration and the
    Megatron-Core router (which import their extras; tests/test_megatron.py checks the latter
    without megatron-core) load with the testbed, transformers, matplotlib, tokenizers and
    scikit-learn blocked."""
    blocked = ("smar.testbed", "transformers", "matplotlib", "tokenizers", "sklearn", "tqdm")
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in LIBRARY
        if p.name != "__init__.py"
        and "hf" not in p.relative_to(ROOT).parts
        and p.relative_to(ROOT).as_posix() not in ("megatron/router.py", "megatron/spec.py")
    ]
    code = f"""
import importlib, sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked by the layout test: " + name)
        return None
sys.meta_path.insert(0, Block())
import smar
for m in {modules!r}:
    importlib.import_module("smar." + m)
loaded = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
assert not loaded, loaded
print("ok", len({modules!r}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


def test_the_blocker_blocks():
    code = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('smar.testbed'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "import smar.testbed.model\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "ImportError" in res.stderr
