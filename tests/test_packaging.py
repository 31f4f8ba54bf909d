"""The package as published: one version everywhere, the license, and the installed wheel.

The version lives in ``smar/__init__.py`` alone (pyproject.toml reads it); ``smar --version``, the
installed metadata and CHANGELOG.md's newest release must say the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, metadata, version
from pathlib import Path

import pytest

import smar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def newest_release(changelog: str) -> str:
    """The version of the first ``## [X.Y.Z] - YYYY-MM-DD`` heading (``[Unreleased]`` is not one)."""
    found = re.search(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert found, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' section"
    return found.group(1)


def test_one_version_everywhere():
    try:
        installed = version("smar")
    except PackageNotFoundError:
        pytest.fail("smar is not installed; fix: pip install -e .")
    smar_cmd = shutil.which("smar", path=str(Path(sys.executable).parent)) or shutil.which("smar")
    cmd = [smar_cmd] if smar_cmd else [sys.executable, "-m", "smar.cli"]
    done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    released = newest_release((ROOT / "CHANGELOG.md").read_text())
    assert done.stdout.strip() == f"smar {smar.__version__}"
    assert installed == smar.__version__, "stale metadata; fix: pip install -e ."
    assert released == smar.__version__, "CHANGELOG.md's newest release is not smar.__version__"


def test_the_version_is_a_literal_read_without_importing():
    """setuptools reads ``smar.__version__`` statically (an isolated build has no torch), which
    needs a plain literal assignment; pyproject.toml declares no version of its own."""
    init = (ROOT / "smar" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', init, flags=re.M)
    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "smar.__version__"}


def test_the_license_is_apache_2_and_in_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert "Copyright 2026 The smar authors" in text
    try:
        meta = metadata("smar")
    except PackageNotFoundError:
        pytest.skip("smar is not installed")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])


@pytest.mark.slow
def test_the_installed_wheel_works_on_its_own():
    """scripts/check_wheel.py: build, a fresh virtualenv, import, --version, the smoke demo and
    the library's fast tests from outside the checkout (a few minutes; needs the package index)."""
    pytest.importorskip("build", reason="the build package is in the dev extra")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_wheel.py")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "works installed on its own" in done.stdout
