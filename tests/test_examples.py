"""Every script in examples/ runs (in-process, to share the already imported transformers)."""

import pathlib
import runpy
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


def test_there_is_one_example_per_path():
    names = {p.stem for p in EXAMPLES}
    assert {"attach_qwen3_vl_moe", "trainer_llava_mixtral", "upcycle_llava_qwen2"} <= names


# the command line each example runs with (the others take none)
ARGS = {"sft_vlm_trl": ["--demo"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(path), *ARGS.get(path.stem, [])])
    runpy.run_path(str(path), run_name="__main__")
