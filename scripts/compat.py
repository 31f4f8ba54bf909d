"""The Hugging Face tests against the lowest and the newest transformers smar declares.

For each release it makes a throwaway virtualenv, installs torch, then smar with its ``dev`` extra
and that transformers pinned (pip pairs peft, trl and accelerate with it), and runs every test file
that uses transformers (the default suite's selection, ``-m "not slow"``). It prints one summary
line per release and writes them to ``compat.json`` in the work folder.

    python scripts/compat.py                       # lowest and newest
    python scripts/compat.py --release 5.3.0       # any other release
    python scripts/compat.py --keep                # keep the virtualenvs (reruns skip the install)

Slow (minutes per release: the installs, then the tests) and not part of CI's run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build (README: install torch first)
PAIRED = ("transformers", "peft", "trl", "accelerate", "torch")


def lowest_declared() -> str:
    """The lowest transformers release ``pyproject.toml``'s ``hf`` extra accepts."""
    hf = re.search(r"^hf = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    match = hf and re.search(r'"transformers>=\s*([\w.]+)', hf.group(1))
    if not match:
        raise SystemExit("compat: no 'transformers>=' in pyproject.toml's extra 'hf'")
    version = match.group(1)
    return version + ".0" * (2 - version.count("."))


def hf_test_files() -> list[str]:
    """The test files that use transformers."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"^\s*(import transformers|from transformers|.*importorskip\(\"transformers)",
                     p.read_text(), re.M)
    )  # fmt: skip


def run(cmd: list[str], log, **kw) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw).returncode


def check(release: str, label: str, work: pathlib.Path, keep: bool) -> dict:
    venv = work / f"venv-{release}"
    log_path = work / f"{release}.log"
    py = venv / "bin" / "python"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        if not (keep and py.exists()):
            shutil.rmtree(venv, ignore_errors=True)
            pin = f"transformers=={release}" if release != "newest" else "transformers"
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(py), "-m", "pip", "install", "-q", TORCH],
                [str(py), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]", pin],
            ]
            for step in steps:
                if run(step, log) != 0:
                    return dict(release=release, label=label, result="install failed",
                                log=str(log_path))  # fmt: skip
        versions = {}
        for name in PAIRED:
            out = subprocess.run([str(py), "-m", "pip", "show", name], capture_output=True,
                                 text=True).stdout  # fmt: skip
            versions[name] = next((v.split(":", 1)[1].strip() for v in out.splitlines()
                                   if v.startswith("Version:")), None)  # fmt: skip
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        cmd = [str(py), "-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider",
               *hf_test_files()]  # fmt: skip
        rc = run(cmd, log, cwd=ROOT, env=env)
    text = log_path.read_text()
    tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    families = [ln for ln in text.splitlines() if "test_families.py" in ln and "SKIPPED" in ln]
    if not (keep or rc):
        shutil.rmtree(venv, ignore_errors=True)
    return dict(
        release=versions["transformers"] or release, label=label, result=tail[-1] if tail else
        f"pytest exit {rc}", exit=rc, versions=versions, family_skips=len(families),
        minutes=round((time.monotonic() - t0) / 60, 1), log=str(log_path),
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", action="append", help="a transformers release (repeatable); "
                    "default: the lowest declared and the newest pip installs")  # fmt: skip
    ap.add_argument("--work", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
                    .expanduser() / "smar" / "compat")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the virtualenvs")
    args = ap.parse_args(argv)
    targets = [(r, "given") for r in args.release or ()] or [
        (lowest_declared(), "lowest declared"), ("newest", "newest"),
    ]  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for release, label in targets:
        print(f"compat: transformers {release} ({label}) ...", flush=True)
        results.append(check(release, label, args.work, args.keep))
        r = results[-1]
        pins = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items() if k != "torch")
        print(f"  {r['release']} ({label}): {r['result']}; {pins}; {r.get('minutes')} min; "
              f"log {r['log']}", flush=True)  # fmt: skip
    tmp = args.work / "compat.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.work / "compat.json")
    return 0 if all(r.get("exit") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
