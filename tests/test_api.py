"""The public surface is pinned: changing it is a deliberate act."""

import subprocess
import sys

import smar
from smar import cli


def test_public_api_is_pinned():
    assert sorted(smar.__all__) == sorted(
        [
            "Routing",
            "RoutingStats",
            "SMARConfig",
            "SmarError",
            "UsageError",
            "attach",
            "limoe_loss",
            "load_balancing_loss",
            "modality_distributions",
            "mrd",
            "mrd_matrix",
            "prepare_routing",
            "record",
            "routing_objective",
            "routing_probs",
            "smar_loss",
            "upcycle_hf",
            "z_loss",
        ]
    )
    for name in smar.__all__:
        assert getattr(smar, name) is not None


def test_cli_commands_are_pinned():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert (
        sorted(sub.choices)
        == sorted(cli.COMMANDS)
        == ["analyze", "demo", "inspect", "real", "retention", "sweep"]
    )


def test_import_smar_needs_only_torch():
    code = (
        "import sys, smar; heavy = [m for m in ('transformers', 'matplotlib', 'tokenizers', "
        "'sklearn') if m in sys.modules]; print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_options_are_pinned():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    options = {
        name: sorted(s for a in p._actions for s in (a.option_strings or [a.dest]))
        for name, p in sub.choices.items()
    }
    assert options == {
        "demo": ["--help", "--out", "--quiet", "--smoke", "-h", "overrides"],
        "inspect": ["--adapter", "--help", "-h", "model_dir"],
        "sweep": ["--help", "-h", "overrides"],
        "real": [
            "--align-lr",
            "--align-steps",
            "--arms",
            "--cache",
            "--eval-precision",
            "--force",
            "--freeze-dense",
            "--help",
            "--lr",
            "--out",
            "--precision",
            "--quiet",
            "--router-lr",
            "--seeds",
            "--smoke",
            "--steps",
            "--workers",
            "-h",
            "stage",
        ],
        "analyze": [
            "--batch-size",
            "--data",
            "--help",
            "--max-samples",
            "--no-bias",
            "--out",
            "--quiet",
            "--skip-bad-images",
            "-h",
            "dirs",
        ],
        "retention": [
            "--base",
            "--batch-size",
            "--help",
            "--include-path",
            "--limit",
            "--local-only",
            "--metric",
            "--no-bias",
            "--out",
            "--tasks",
            "--tasks-dir",
            "--tuned",
            "-h",
        ],
    }
