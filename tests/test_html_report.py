"""The HTML report: self-contained (images as data URIs, no network, no script), escaped, and
rendered by headless Chromium with no console error and every section in the DOM (skipped
without a ``chromium`` binary; Debian's ``chromium`` package provides it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from smar.analyze import Source, analyze, write_analysis
from smar.html_report import SECTIONS, Section, Table, render_html

pytest.importorskip("matplotlib")


def test_page_is_self_contained_and_escaped(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = render_html("a <b> & c", [
        Section("one", "One <i>", ["x < y"], [(png, "cap & more")],
                [Table(["k", "v"], [["nan", float("nan")], ["pi", 3.14159]], flagged=[1])]),
        Section("two", "Two")])  # fmt: skip
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "a &lt;b&gt; &amp; c" in page and "x &lt; y" in page and "n/a" in page
    assert "3.142" in page and 'class="flag"' in page and "data:image/png;base64," in page
    assert re.findall(r'<section id="(\w+)"', page) == ["one", "two"]
    with pytest.raises(ValueError, match="unique"):
        render_html("t", [Section("a", "A"), Section("a", "B")])
    with pytest.raises(ValueError, match="section id"):
        Section("a b", "A")


def _report(tmp_path):
    def source(name, seed):
        g = torch.Generator().manual_seed(seed)
        data = [([torch.randn(20, 8, generator=g) * 3 for _ in range(4)],
                 torch.randint(0, 2, (20,), generator=g)) for _ in range(3)]  # fmt: skip
        hist = [{"step": s, "mrd": [s / 100 + i / 10 for i in range(4)]} for s in range(0, 101, 25)]
        return Source(name, lambda: iter(data), top_k=2, history=hist, info={"model": "random"})

    runs = [analyze(source("none_seed0", 0), progress=False),
            analyze(source("smar_seed0", 1), progress=False)]  # fmt: skip
    return write_analysis(runs, tmp_path)["html"]


def test_every_section_is_written(tmp_path):
    page = _report(tmp_path).read_text()
    assert re.findall(r'<section id="(\w+)"', page) == list(SECTIONS)
    # The composition section names the grey cells and counts them (here every expert is used).
    assert "Grey hatched: an expert that received no token; 0 such experts." in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary")
def test_headless_chromium_renders_every_section_without_console_errors(tmp_path):
    html = _report(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    url = html.resolve().as_uri()
    shot = tmp_path / "screenshot.png"
    res = subprocess.run(
        ["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom.stdout, sid
    assert dom.stdout.count("data:image/png;base64,") >= 7
    for err in (res.stderr, dom.stderr):
        bad = [line for line in err.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not bad, bad
