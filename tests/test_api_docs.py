"""The API reference: every public object documents its parameters, and the site builds strictly.

The public objects are ``smar.__all__`` and the ``__all__`` of ``smar.hf`` and ``smar.megatron``.
Each callable has a docstring that names each of its parameters (a class: in its docstring or its
``__init__``'s; a dataclass's fields are its parameters). ``*args``/``**kwargs`` are left out only
where they pass another library's arguments through (:data:`PASS_THROUGH`).

``mkdocs build --strict`` (mkdocs.yml: docs/*.md and the API pages of docs/api/, rendered from
the docstrings by mkdocstrings) turns every warning into an error: a broken link, a page left
out of the nav, a docstring entry that names no parameter.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# where *args / **kwargs are another library's arguments, passed through unchanged
PASS_THROUGH = {
    "smar.hf.SMARTrainerMixin": "transformers.Trainer's arguments",
    "smar.hf.SMARTrainer": "transformers.Trainer's arguments",
    "smar.hf.from_pretrained_upcycled": "from_pretrained's keyword arguments",
    "smar.hf.load_model_dir": "from_pretrained's keyword arguments",
    "smar.megatron.SMARRouter": "Megatron-Core TopKRouter's keyword arguments",
}
NEEDS = {"smar.hf": "transformers"}  # smar.megatron's router and spec import megatron-core


def _public(module: str) -> list[tuple[str, str]]:
    names = importlib.import_module(module).__all__ if module == "smar" else _all_of(module)
    return [(module, name) for name in names]


def _all_of(module: str) -> list[str]:
    """A subpackage's ``__all__`` read without importing it (it may need an extra)."""
    text = (ROOT / module.replace(".", "/") / "__init__.py").read_text()
    block = re.search(r"^__all__ = \[(.*?)\]", text, flags=re.S | re.M)
    assert block, f"{module} has no __all__"
    return re.findall(r"\"(\w+)\"", block.group(1))


PUBLIC = _public("smar") + _public("smar.hf") + _public("smar.megatron")


def _docstring(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        init = next(c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__)
        if init is not object.__init__:
            doc += "\n" + (inspect.getdoc(init) or "")
    return doc


def _parameters(obj: object, qualname: str) -> list[str]:
    try:
        params = inspect.signature(obj).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature to read
        return []
    names = [p.name for p in params if p.name not in ("self", "cls")]
    if dataclasses.is_dataclass(obj):
        names += [f.name for f in dataclasses.fields(obj) if f.name not in names]
    varargs = {p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if qualname in PASS_THROUGH:
        names = [n for n in names if n not in varargs]
    return names


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_objects_document_every_parameter(module, name):
    if module in NEEDS and importlib.util.find_spec(NEEDS[module]) is None:
        pytest.skip(f"{module} needs {NEEDS[module]}, not installed")
    try:
        obj = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:  # a name imported on first use, from an extra
        if (e.name or "smar").split(".")[0] == "smar":
            raise
        pytest.skip(f"{module}.{name} needs {e.name}, not installed")
    if not callable(obj):  # a constant: documented in its module's docstring
        return
    doc = _docstring(obj)
    assert doc.strip(), f"{module}.{name} has no docstring"
    missing = [
        p
        for p in _parameters(obj, f"{module}.{name}")
        if not re.search(rf"(?<![\w.]){re.escape(p)}\b", doc)
    ]
    assert not missing, f"{module}.{name}'s docstring does not name its parameters {missing}"


def test_pass_through_entries_are_public_and_take_varargs():
    public = {f"{m}.{n}" for m, n in PUBLIC}
    assert set(PASS_THROUGH) <= public
    for qualname in PASS_THROUGH:
        module, name = qualname.rsplit(".", 1)
        try:
            obj = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:  # transformers or megatron-core not installed
            continue
        kinds = {p.kind for p in inspect.signature(obj).parameters.values()}
        assert kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, qualname


# ----------------------------------------------------------------------------------------------
# the site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for needed in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers", "material"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed; fix: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
        + ["-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),  # Material's notice about MkDocs 2.0
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_mkdocs_build_strict(site):
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    assert all((site / page / "index.html").exists() for page in pages)
    assert (site / "api" / "smar" / "index.html").exists()


def test_the_api_pages_show_every_public_name(site):
    html = "".join(p.read_text() for p in (site / "api").rglob("index.html"))
    for module, name in PUBLIC:
        shown = (
            f"smar.hf.{name}" if (module, name) == ("smar", "upcycle_hf") else f"{module}.{name}"
        )
        if name.isupper():  # a constant: in its module's docstring
            continue
        assert f'id="{shown}"' in html, f"{shown} is on no API page"


def test_links_within_the_site_reach_their_anchor(site):
    """mkdocs checks the anchors of links written in the pages; these are all of them, those the
    docstrings cite too (``docs/method.md#mrd``, made links by scripts/griffe_smar.py)."""
    for page in site.rglob("index.html"):
        html = page.read_text()
        for target, anchor in re.findall(r'href="((?:\.\./)*[\w/-]*)#([\w.-]+)"', html):
            other = (page.parent / target).resolve() / "index.html" if target else page
            assert other.exists(), f"{page.relative_to(site)} links to {target}"
            assert f'id="{anchor}"' in other.read_text(), (
                f"{page.relative_to(site)} links to {target}#{anchor}, which has no such anchor"
            )
