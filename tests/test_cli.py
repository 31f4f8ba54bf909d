"""``smar --version`` and the help texts of every command (bad input: tests/test_cli_errors.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

import smar
from smar import cli

MARKUP = ("``", ":class:", ":func:", ":meth:", ":mod:", "`")


def _subcommands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_version_prints_the_package_version_and_exits_0(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out == f"smar {smar.__version__}\n" and out.err == ""
    try:
        assert smar.__version__ == version("smar")  # the installed metadata says the same
    except PackageNotFoundError:
        pass


def test_version_from_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "smar.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"smar {smar.__version__}"


def test_every_command_is_listed():
    assert _subcommands() == sorted(cli.COMMANDS)


@pytest.mark.parametrize("command", [[], *([c] for c in sorted(cli.COMMANDS))], ids=str)
def test_help_has_no_rest_markup(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smar")
    assert not [m for m in MARKUP if m in out], out
    if not command:
        assert "The smar command: thin commands over the library." in out
        assert all(c in out for c in cli.COMMANDS)


def test_markup_from_a_subcommand_docstring_is_stripped(capsys):
    # The modules that add commands write their own help texts, some from docstrings.
    p = cli._Parser(prog="smar")
    sub = p.add_subparsers(dest="command")
    doc = "Runs ``smar x`` on a :class:`~smar.RoutingStats` (see :func:`smar.mrd`, `Title`)."
    x = sub.add_parser("x", help=doc, description=doc, epilog=doc)
    x.add_argument("--flag", action="store_true", help=doc)
    cli._plain_help(p)
    plain = "Runs smar x on a RoutingStats (see smar.mrd, Title)."
    assert x.description == x.epilog == plain
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    with pytest.raises(SystemExit):
        p.parse_args(["x", "--help"])
    out = capsys.readouterr().out
    assert "`" not in out and out.count("RoutingStats") == 4


def test_plain_keeps_text_without_markup():
    text = "section.field=value, e.g. tune.lr=3e-4 (default 8); it's %(default)s"
    assert cli.plain(text) == text
    assert cli.plain(None) is None
