"""Writes the tables of MoE families of docs/huggingface.md from a run of tests/test_families.py
and tests/test_families_multimodal.py.

    python scripts/family_table.py            # run both sweeps, rewrite the tables
    python scripts/family_table.py --check    # run them, exit 1 if a table differs

Each family's row comes from what its tests did in this run, not from what tests/helpers/families.py
declares: full (every check passed), capture only or not supported (skipped with the reason
printed), not yet checked, an upstream defect of the installed transformers, or failed.
The table sits between docs/huggingface.md's ``<!-- families:begin -->`` and
``<!-- families:end -->``; the multimodal one (per family: its multimodal forward, smar's modality
ids, smar's router read, the bias step) between ``<!-- multimodal:begin -->`` and
``<!-- multimodal:end -->``.
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
MM_BEGIN, MM_END = "<!-- multimodal:begin -->", "<!-- multimodal:end -->"
ORDER = ("full", "capture only", "not supported", "upstream defect", "not yet checked", "failed")
# tests/test_families_multimodal.py's tests: the table's columns
COLUMNS = {
    "test_multimodal_forward_runs": "multimodal forward",
    "test_modality_ids_are_the_configs": "ids = config's",
    "test_router_read_is_the_routers_own_pre_activation_scores": "router read = own scores",
    "test_band_loss_step_moves_the_bias_of_each_present_modality": "bias rows moved",
}


class Outcomes:
    """A pytest plugin that keeps each family's test outcomes: ``{family: [(outcome, why)]}``."""

    def __init__(self):
        self.by_family: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        # the multimodal sweep: {family: {test name: (outcome, why)}}, and what each batch held
        self.multimodal: dict[str, dict[str, tuple[str, str]]] = collections.defaultdict(dict)
        self.modalities: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        match = re.search(r"::(\w+)\[(\w+)\]$", report.nodeid)
        if not match or (report.when != "call" and not report.skipped and not report.failed):
            return
        why = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            why = report.longrepr[2].removeprefix("Skipped: ")
        elif report.failed:
            why = str(report.longrepr).splitlines()[-1][:200]
        test, family = match.groups()
        if "test_families_multimodal.py" in report.nodeid:
            self.multimodal[family][test] = (report.outcome, why)
            self.modalities.update(dict(report.user_properties).get("modalities", {}))
        else:
            self.by_family[family].append((report.outcome, why))


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


def _cell(outcome: str, why: str) -> str:
    if outcome == "passed":
        return "yes"
    if outcome == "failed":
        return f"**failed**: {why}"
    return "skipped: " + why.split(": ", 1)[-1].split(": ", 1)[0]  # "<family>: <status>: <why>"


def multimodal_table(mm: dict, modalities: dict, version: str) -> str:
    """Per family: its multimodal forward and the checks, or why they were skipped."""
    rows = ["| family | modalities | " + " | ".join(COLUMNS.values()) + " |",
            "|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    runs = 0
    for family in sorted(mm):
        tests = mm[family]
        forward = tests.get(next(iter(COLUMNS)), ("skipped", ""))
        if forward[0] == "skipped":  # one reason for the whole row
            rows.append(f"| {family} | | skipped: {forward[1].split(': ', 1)[-1]} |"
                        + " |" * (len(COLUMNS) - 1))  # fmt: skip
            continue
        runs += forward[0] == "passed"
        cells = [_cell(*tests.get(t, ("skipped", "not run"))) for t in COLUMNS]
        rows.append(f"| {family} | {modalities.get(family, '')} | " + " | ".join(cells) + " |")
    head = (f"Written by `python scripts/family_table.py` from the run of "
            f"tests/test_families_multimodal.py on transformers {version}: {len(mm)} multimodal "
            f"families, {runs} run their multimodal forward.")  # fmt: skip
    return "\n".join([MM_BEGIN, head, "", *rows, MM_END])


def _replace(text: str, begin: str, end: str, new: str) -> tuple[str, bool]:
    """``text`` with the block between ``begin`` and ``end`` replaced, and whether it changed."""
    if begin not in text or end not in text:
        raise SystemExit(f"family_table: {PAGE} has no {begin} ... {end} block")
    before, rest = text.split(begin, 1)
    old, after = rest.split(end, 1)
    return before + new + after, (begin + old + end) != new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the table differs")
    args = ap.parse_args(argv)
    import transformers

    plugin = Outcomes()
    tests = [str(ROOT / "tests" / f) for f in ("test_families.py", "test_families_multimodal.py")]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *tests], plugins=[plugin])
    statuses = {f: classify(o) for f, o in plugin.by_family.items()}
    new = table(statuses, transformers.__version__)
    new_mm = multimodal_table(plugin.multimodal, plugin.modalities, transformers.__version__)
    text, changed = _replace(PAGE.read_text(), BEGIN, END, new)
    text, changed_mm = _replace(text, MM_BEGIN, MM_END, new_mm)
    if args.check:
        same = not (changed or changed_mm)
        print(f"family_table: {PAGE.name} tables " + ("match the run" if same else "differ"))
        return 0 if same and code == 0 else 1
    from smar.atomic import write_text

    write_text(PAGE, text)
    print(new.splitlines()[1])
    print(new_mm.splitlines()[1])
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
