"""The installed wheel works on its own: build it, install it in a fresh virtualenv, run it there.

    python scripts/check_wheel.py [--keep] [--no-demo] [--tests test_losses.py ...]

1. ``python -m build`` makes the sdist and, from it, the wheel (in an isolated build environment,
   so the version is read from ``smar/__init__.py`` without torch), into a temporary folder;
   the wheel's file list is checked: the package, its ``py.typed`` and the LICENSE, and no tests,
   docs, caches or egg-info.
2. A virtualenv without the system's site-packages (so the checkout's editable install is not
   seen) gets ``torch==2.13.0`` first (pip keeps the CPU build), then the wheel with the ``demo``
   extra and pytest and hypothesis.
3. From a temporary folder outside the checkout: ``import smar`` must come from the virtualenv,
   ``smar --version`` must print the version of ``smar/__init__.py``, ``smar demo --smoke`` runs
   (into the temporary folder; stages are taken from the user's smar cache when there), and the
   library's fast tests (:data:`TESTS`, which need only torch, pytest and hypothesis; the few that
   need transformers skip) run with ``--import-mode=importlib`` from a copy of their files.

Each step prints one line; the script exits 1 at the first failure, naming it. It takes a few
minutes (most of it the virtualenv's installs and the demo); ``tests/test_packaging.py`` runs it
(slow).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
EXTRAS = "demo"  # smar demo --smoke needs plot and eval
# The library's fast tests: they import smar, torch, pytest and hypothesis only (a few skip
# without transformers), and read no file of the checkout.
TESTS = [
    "test_losses.py",
    "test_losses_numerics.py",
    "test_metrics.py",
    "test_pairs.py",
    "test_moe.py",
    "test_modality.py",
    "test_errors.py",
    "test_cli.py",
]
PYTEST_INI = """[pytest]
markers =
    slow: long runs, left out here
addopts = -m "not slow" -p no:cacheprovider
"""


class Failed(Exception):
    """A step of the check failed; the message says which and why."""


def source_version() -> str:
    """The version literal of ``smar/__init__.py`` (the one source of the version)."""
    text = (ROOT / "smar" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, flags=re.M)
    if not found:
        raise Failed('smar/__init__.py has no literal __version__ = "..."')
    return found.group(1)


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], what: str) -> str:
    """Run ``cmd``; its stdout, or :class:`Failed` with the tail of its output."""
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise Failed(f"{what}: exit {done.returncode} after {took:.0f} s\n{tail}")
    print(f"ok  {what} ({took:.0f} s)", flush=True)
    return done.stdout


def check_wheel_files(wheel: Path, version: str) -> list[str]:
    """The wheel holds the package, ``py.typed`` and the LICENSE; no tests, docs or leftovers."""
    names = zipfile.ZipFile(wheel).namelist()
    info = f"smar-{version}.dist-info/"
    wrong = [
        n
        for n in names
        if not (n.startswith("smar/") or n.startswith(info))
        or "__pycache__" in n
        or n.endswith((".pyc", ".pyo"))
        or ".egg-info" in n
    ]
    if wrong:
        raise Failed(f"the wheel holds files it should not: {wrong[:10]}")
    for needed in (
        "smar/__init__.py",
        "smar/py.typed",
        "smar/testbed/config.py",
        f"{info}licenses/LICENSE",
        f"{info}METADATA",
    ):
        if needed not in names:
            raise Failed(f"the wheel lacks {needed}")
    print(
        f"ok  the wheel's {len(names)} files: smar/, py.typed, {info}licenses/LICENSE", flush=True
    )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--no-demo", action="store_true", help="leave out smar demo --smoke")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files of tests/ to run")
    args = parser.parse_args(argv)

    version = source_version()
    tmp = Path(tempfile.mkdtemp(prefix="smar-wheel-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        # 1. build (sdist, then the wheel from it) and look at the wheel
        dist = tmp / "dist"
        run(
            [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
            cwd=tmp,
            env=env,
            what="python -m build (isolated: sdist, then the wheel from it)",
        )
        wheels = sorted(dist.glob("smar-*.whl"))
        if [w.name for w in wheels] != [f"smar-{version}-py3-none-any.whl"]:
            raise Failed(
                f"expected smar-{version}-py3-none-any.whl; built {[w.name for w in wheels]}"
            )
        check_wheel_files(wheels[0], version)

        # 2. a fresh virtualenv that cannot see the checkout's editable install
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env, what="python -m venv")
        bin_ = venv / "bin"
        py = str(bin_ / "python")
        venv_env = dict(env, VIRTUAL_ENV=str(venv), PATH=f"{bin_}{os.pathsep}{env.get('PATH', '')}")
        run(
            [py, "-m", "pip", "install", "-q", TORCH],
            cwd=tmp,
            env=venv_env,
            what=f"pip install {TORCH}",
        )
        run(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                TORCH,
                f"{wheels[0]}[{EXTRAS}]",
                "pytest>=8",
                "hypothesis>=6",
            ],
            cwd=tmp,
            env=venv_env,
            what=f"pip install {wheels[0].name}[{EXTRAS}] pytest hypothesis",
        )

        # 3. from a folder outside the checkout
        work = tmp / "work"
        work.mkdir()
        where = run(
            [py, "-c", "import smar; print(smar.__file__)"],
            cwd=work,
            env=venv_env,
            what="import smar",
        ).strip()
        if not Path(where).resolve().is_relative_to(venv.resolve()):
            raise Failed(f"import smar found {where}, not the virtualenv's copy")
        print(f"    smar from {where}", flush=True)
        out = run([str(bin_ / "smar"), "--version"], cwd=work, env=venv_env, what="smar --version")
        if out.strip() != f"smar {version}":
            raise Failed(f"smar --version printed {out.strip()!r}; expected 'smar {version}'")
        if not args.no_demo:
            run(
                [str(bin_ / "smar"), "demo", "--smoke", "--quiet", "--out", str(work / "smoke")],
                cwd=work,
                env=venv_env,
                what="smar demo --smoke",
            )
            if not (work / "smoke" / "report.md").exists():
                raise Failed("smar demo --smoke wrote no report.md")

        tests = work / "tests"
        tests.mkdir()
        for name in args.tests:
            shutil.copy2(ROOT / "tests" / name, tests / name)
        shutil.copytree(
            ROOT / "tests" / "helpers",
            tests / "helpers",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (tests / "pytest.ini").write_text(PYTEST_INI)
        out = run(
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-rs",  # the reasons of the skips, one line each
                "--import-mode=importlib",
                "-c",
                str(tests / "pytest.ini"),
                "--rootdir",
                str(tests),
                *args.tests,
            ],
            cwd=tests,
            env=venv_env,
            what=f"pytest on {len(args.tests)} copied test files",
        )
        lines = out.strip().splitlines()
        for line in [*(x for x in lines if x.startswith("SKIPPED")), lines[-1]]:
            print("    " + line, flush=True)
    except Failed as e:
        print(f"FAILED  {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"the wheel smar-{version} works installed on its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
