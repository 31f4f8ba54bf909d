"""Writes the table of MoE families of docs/huggingface.md from a run of tests/test_families.py.

    python scripts/family_table.py            # run the sweep, rewrite the table
    python scripts/family_table.py --check    # run it, exit 1 if the table differs

Each family's row comes from what its tests did in this run, not from what tests/helpers/families.py
declares: full (every check passed), capture only or not supported (skipped with the reason
printed), not yet checked, an upstream defect of the installed transformers, or failed.
The table sits between docs/huggingface.md's ``<!-- families:begin -->`` and
``<!-- families:end -->``.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "huggingface.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
ORDER = ("full", "capture only", "not supported", "upstream defect", "not yet checked", "failed")


class Outcomes:
    """A pytest plugin that keeps each family's test outcomes: ``{family: [(outcome, why)]}``."""

    def __init__(self):
        self.by_family: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)

    def pytest_runtest_logreport(self, report):
        match = re.search(r"\[(\w+)\]$", report.nodeid)
        if not match or (report.when != "call" and not report.skipped and not report.failed):
            return
        why = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            why = report.longrepr[2].removeprefix("Skipped: ")
        elif report.failed:
            why = str(report.longrepr).splitlines()[-1][:200]
        self.by_family[match.group(1)].append((report.outcome, why))


def classify(outcomes: list[tuple[str, str]]) -> tuple[str, str]:
    """A family's status and reason from its tests' outcomes."""
    failed = [why for outcome, why in outcomes if outcome == "failed"]
    if failed:
        return "failed", failed[0]
    skips = [why for outcome, why in outcomes if outcome == "skipped"]
    if not skips:
        return "full", ""
    for status in ORDER[1:]:
        for why in skips:
            _, sep, reason = why.partition(f"{status}: ")
            if sep:
                return status, reason
    return "failed", f"skipped for an unknown reason: {skips[0]}"


def table(statuses: dict[str, tuple[str, str]], version: str) -> str:
    rows = ["| status | families | why |", "|---|---|---|"]
    for status in ORDER:
        members = sorted(f for f, (s, _) in statuses.items() if s == status)
        if not members:
            continue
        if status == "full":
            rows.append(f"| full, {len(members)} | {', '.join(members)} | every check passes |")
            continue
        first = True
        for family in members:
            label = f"{status}, {len(members)}" if first else ""
            rows.append(f"| {label} | {family} | {statuses[family][1]} |")
            first = False
    counts = collections.Counter(s for s, _ in statuses.values())
    head = (f"Written by `python scripts/family_table.py` from the run of tests/test_families.py "
            f"on transformers {version}: {len(statuses)} families, "
            + ", ".join(f"{counts[s]} {s}" for s in ORDER if counts[s]) + ".")  # fmt: skip
    return "\n".join([BEGIN, head, "", *rows, END])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the table differs")
    args = ap.parse_args(argv)
    import transformers

    plugin = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_families.py")],
                       plugins=[plugin])  # fmt: skip
    statuses = {f: classify(o) for f, o in plugin.by_family.items()}
    new = table(statuses, transformers.__version__)
    text = PAGE.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"family_table: {PAGE} has no {BEGIN} ... {END} block")
    before, rest = text.split(BEGIN, 1)
    old, after = rest.split(END, 1)
    if args.check:
        same = (BEGIN + old + END) == new
        print(f"family_table: {PAGE.name} table " + ("matches the run" if same else "differs"))
        return 0 if same and code == 0 else 1
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(before + new + after)
    tmp.replace(PAGE)
    print(new.splitlines()[1])
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
