"""A self-contained HTML report: one ``index.html`` with its images embedded as base64 data URIs
and its numbers in HTML tables. No network, no JavaScript: it opens from a file anywhere and can
be mailed or attached as it is.

The page is a list of :class:`Section` (an ``id``, a title, paragraphs, images and tables);
:func:`write_html` writes it atomically. :func:`write_report` is the page of ``smar analyze``:
``routing.json``, the routing plots of :mod:`smar.plots` and the sections of :data:`SECTIONS`,
for one source or several compared.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from smar.atomic import publish
from smar.errors import UsageError

if TYPE_CHECKING:
    from smar.analyze import Analysis

__all__ = ["Section", "Table", "write_html", "render_html", "write_report", "SECTIONS"]

# Every page of ``smar analyze`` has these sections (a note where one does not apply).
SECTIONS = ("summary", "mrd", "usage", "composition", "entropy", "comparison", "history")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
nav ul { columns: 2; } figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.flag { background: #fde2e2; } .note { color: #555; }
"""


@dataclass
class Table:
    """A table: a header row and rows of cells (numbers are formatted with ``fmt``).

    Attributes:
        header: column names.
        rows: cell values; floats are written with ``fmt``, NaN as ``n/a``.
        caption: shown above the table.
        flagged: indices of rows to highlight.
        fmt: format of float cells.
    """

    header: Sequence[str]
    rows: Sequence[Sequence]
    caption: str = ""
    flagged: Sequence[int] = ()
    fmt: str = "{:.3f}"


@dataclass
class Section:
    """One part of the page, reachable as ``index.html#<id>``.

    Attributes:
        id: the HTML id (letters, digits, ``-`` and ``_``).
        title: the heading.
        paragraphs: plain text paragraphs (escaped).
        images: PNG files to embed, each with a caption: ``(path, caption)``.
        tables: tables below the images.
    """

    id: str
    title: str
    paragraphs: Sequence[str] = ()
    images: Sequence[tuple[str | os.PathLike, str]] = ()
    tables: Sequence[Table] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.id or not all(c.isalnum() or c in "-_" for c in self.id):
            raise UsageError(f"section id {self.id!r} must be letters, digits, '-' or '_'")


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else html.escape(fmt.format(value))
    return html.escape(str(value))


def _table(t: Table) -> str:
    out = ["<table>"]
    if t.caption:
        out.append(f"<caption>{html.escape(t.caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header) + "</tr>")
    flagged = set(t.flagged)
    for i, row in enumerate(t.rows):
        cls = ' class="flag"' if i in flagged else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_cell(v, t.fmt)}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _image(path: str | os.PathLike, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(caption or Path(path).name)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_html(title: str, sections: Sequence[Section], *, intro: Sequence[str] = ()) -> str:
    """The page as a string (see :func:`write_html`)."""
    ids = [s.id for s in sections]
    if len(set(ids)) != len(ids):
        raise UsageError(f"section ids must be unique; got {ids}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f'<p class="note">{html.escape(p)}</p>' for p in intro]
    parts.append("<nav><ul>")
    parts += [f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in sections]
    parts.append("</ul></nav>")
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        parts += [_image(p, c) for p, c in s.images]
        parts += [_table(t) for t in s.tables]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(
    out_dir: str | os.PathLike,
    sections: Sequence[Section],
    *,
    title: str = "smar: routing report",
    intro: Sequence[str] = (),
    name: str = "index.html",
) -> Path:
    """Writes ``out_dir/index.html`` atomically: the sections with their PNGs embedded.

    Args:
        out_dir: the folder (created if needed).
        sections: the page's parts, in order; their ids must be unique.
        title: page title and heading.
        intro: paragraphs under the heading.
        name: the file name.

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(render_html(title, sections, intro=intro), out / name)
    return out / name


def _write_text(text: str, path: Path) -> None:
    """Atomically: a unique temporary file beside ``path``, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "run"


def _mean(values: Sequence[float | None]) -> float:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def write_report(
    analyses: Sequence[Analysis],
    records: list[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    title: str | None = None,
    threshold: float = 0.9,
) -> dict[str, Path]:
    """The ``smar analyze`` page: ``routing.json``, the plots and ``index.html`` in ``out_dir``.

    Args:
        analyses: :class:`smar.analyze.Analysis` objects (one per run or model; several are
            compared).
        records: their :func:`smar.analyze.routing_record` (what ``routing.json`` holds).
        out_dir: the folder.
        title: the page title (default: names the runs).
        threshold: share of an expert's top-k slots from which one modality holds it alone.

    Returns:
        ``{"routing": path, "html": path, <plot name>: path, ...}``.
    """
    from smar import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"routing": out / "routing.json"}
    _write_text(json.dumps({"runs": records}, indent=1, allow_nan=False), paths["routing"])
    names = [r["name"] for r in records]
    band = next((tuple(r["band"]) for r in records if r["band"]), None)
    with_mrd = {r["name"]: [_nan(v) for v in r["mrd"]] for r in records if r["mrd"]}
    secs = [_summary(records, threshold)]
    if with_mrd:
        paths["mrd"] = plots.plot_mrd(with_mrd, out / "mrd.png", band=band)
        L = max(len(v) for v in with_mrd.values())
        rows = [[n] + [v[i] if i < len(v) else float("nan") for i in range(L)]
                for n, v in with_mrd.items()]  # fmt: skip
        secs.append(Section("mrd", "MRD per MoE layer", [
            "Modality routing divergence: symmetric KL between the mean routing distributions of "
            "text and image tokens per MoE layer" + (f"; the band {band} is shaded." if band else
            ".")], [(paths["mrd"], "MRD per MoE layer")],
            [Table(["run"] + [f"layer {i}" for i in range(L)], rows)]))  # fmt: skip
    else:
        secs.append(Section("mrd", "MRD per MoE layer", ["No run saw both text and image tokens."]))
    if any(r.get("pairs") for r in records):
        secs.append(_pairs(records, out, paths))
    usage, comp, flagged_rows, unused = [], [], [], 0
    for a, r in zip(analyses, records, strict=True):
        slug, mods = _slug(r["name"]), r["modalities"]
        st = a.stats
        select_count = st._require_data()[1]  # (L, M, E)
        paths[f"usage_{slug}"] = plots.plot_expert_usage(
            st.distributions(), st.load(), mods, out / f"usage_{slug}.png",
            title=f"Expert usage per modality: {r['name']}")  # fmt: skip
        usage.append((paths[f"usage_{slug}"], f"{r['name']}: probability mass and top-k share"))
        paths[f"composition_{slug}"] = plots.plot_expert_composition(
            select_count / select_count.sum(dim=1, keepdim=True).clamp_min(1.0), mods,
            out / f"composition_{slug}.png", threshold=threshold,
            title=f"Modality composition of each expert: {r['name']}")  # fmt: skip
        comp.append((paths[f"composition_{slug}"], f"{r['name']}: share of slots per modality"))
        unused += int((select_count.sum(dim=1) == 0).sum())
        flagged_rows += [[r["name"], x["layer"], x["expert"], x["modality"], x["share"],
                          int(x["slots"])] for x in r["exclusive"]]  # fmt: skip
    secs.append(
        Section(
            "usage",
            "Expert usage per modality",
            [
                "Per modality, layers x experts: the mean router probability of each expert "
                "(mass) and the share of the modality's top-k choices that go to it."
            ],
            usage,
        )
    )
    flag_table = Table(["run", "MoE layer", "expert", "modality", "share of slots", "slots"],
                       flagged_rows, caption=f"Experts held >= {threshold:.0%} by one modality",
                       flagged=range(len(flagged_rows)))  # fmt: skip
    secs.append(Section("composition", "Modality composition of each expert", [
        f"Colour: the text share of each expert's top-k slots (blue: all text, red: no "
        f"text). A letter marks an expert that one modality holds almost alone "
        f"(>= {threshold:.0%}); {len(flagged_rows)} such experts. Grey hatched: an expert that "
        f"received no token; {unused} such experts."],
        comp, [flag_table] if flagged_rows else []))  # fmt: skip
    entropy = {r["name"]: {m: [_nan(v) for v in r["entropy"][m]] for m in r["modalities"]
                           if r["tokens"][m] > 0} for r in records}  # fmt: skip
    paths["entropy"] = plots.plot_entropy(entropy, out / "entropy.png")
    ent_rows = [[n, m] + vals for n, per in entropy.items() for m, vals in per.items()]
    L = max(len(r[2:]) for r in ent_rows)
    secs.append(Section("entropy", "Routing entropy per MoE layer", [
        "Mean per-token routing entropy divided by log(E): 1 is uniform routing, 0 one expert."],
        [(paths["entropy"], "routing entropy per layer")],
        [Table(["run", "modality"] + [f"layer {i}" for i in range(L)], ent_rows)]))  # fmt: skip
    secs.append(_comparison(records, out, paths, plots))
    secs.append(_history(records, out, paths, plots))
    title = title or "Routing report: " + ", ".join(names)
    intro = [f"{r['name']}: " + "; ".join(f"{k} {v}" for k, v in r["info"].items())
             for r in records]  # fmt: skip
    paths["html"] = write_html(out, secs, title=title, intro=intro)
    return paths


def _metrics(r: dict[str, Any]) -> dict[str, float]:
    m = {"mean MRD": _mean(r["mrd"] or []), "mean imbalance": _mean(r["imbalance"])}
    for mod in r["modalities"]:
        m[f"entropy {mod}"] = _mean(r["entropy"][mod])
    m["experts held by one modality"] = len(r["exclusive"])
    return m


def _summary(records: list[dict[str, Any]], threshold: float) -> Section:
    mods = records[0]["modalities"]
    header = ["run", "layers", "experts", "top-k"] + [f"{m} tokens" for m in mods]
    header += list(_metrics(records[0]))
    rows = [[r["name"], r["num_layers"], r["num_experts"], r["top_k"]]
            + [int(r["tokens"][m]) for m in mods] + list(_metrics(r).values())
            for r in records]  # fmt: skip
    return Section("summary", "Summary", [
        "Imbalance: the largest expert's share of all top-k slots times E (1 = balanced). "
        f"Experts held by one modality: >= {threshold:.0%} of their slots."],
        tables=[Table(header, rows)])  # fmt: skip


def _comparison(
    records: list[dict[str, Any]], out: Path, paths: dict[str, Path], plots: ModuleType
) -> Section:
    if len(records) < 2:
        return Section("comparison", "Runs compared",
                       ["One run analysed: give several folders to compare them."])  # fmt: skip
    metrics = {r["name"]: _metrics(r) for r in records}
    paths["comparison"] = plots.plot_comparison(metrics, out / "comparison.png")
    names = list(next(iter(metrics.values())))
    rows = [[n] + list(m.values()) for n, m in metrics.items()]
    return Section("comparison", "Runs compared", [
        "Layer means per run (the per-layer values are in the sections above)."],
        [(paths["comparison"], "runs compared")], [Table(["run"] + names, rows)])  # fmt: skip


def _history(
    records: list[dict[str, Any]], out: Path, paths: dict[str, Path], plots: ModuleType
) -> Section:
    images, rows = [], []
    for r in records:
        hist = [h for h in (r["history"] or []) if h.get("mrd")]
        if not hist:
            continue
        slug = _slug(r["name"])
        band = tuple(r["band"]) if r["band"] else None
        paths[f"history_{slug}"] = plots.plot_mrd_history(
            hist, out / f"history_{slug}.png", band=band,
            title=f"MRD per MoE layer over training steps: {r['name']}")  # fmt: skip
        images.append((paths[f"history_{slug}"], f"{r['name']}: MRD over training steps"))
        last = hist[-1]
        rows.append([r["name"], last["step"]] + [_nan(v) for v in last["mrd"]])
    if not images:
        return Section("history", "MRD over training steps",
                       ["No training history: these are not testbed runs."])  # fmt: skip
    L = max(len(r) - 2 for r in rows)
    return Section("history", "MRD over training steps", [
        "Per-layer MRD on the training batches, recorded while the run trained."], images,
        [Table(["run", "last step"] + [f"layer {i}" for i in range(L)], rows,
               caption="MRD at the last recorded step")])  # fmt: skip


def _pairs(records: list[dict[str, Any]], out: Path, paths: dict[str, Path]) -> Section:
    """More than two modalities: each run's MRD matrix per layer and its held pairs by layer."""
    from smar import pair_plots

    images, rows = [], []
    for r in records:
        if not r.get("pairs"):
            continue
        slug, ids = _slug(r["name"]), r["modality_ids"]
        pos = {m: k for k, m in enumerate(ids)}
        bands: dict[tuple[int, int], Any] = {}  # by positions in the matrix, sorted
        for p in r["pairs"]:
            i, j = sorted((pos[p["ids"][0]], pos[p["ids"][1]]))
            bands[i, j] = p["band"]
        paths[f"matrix_{slug}"] = pair_plots.plot_mrd_matrix(
            r["mrd_matrix"], r["modalities"], out / f"matrix_{slug}.png", bands=bands,
            title=f"MRD of every pair of modalities, per MoE layer: {r['name']}")  # fmt: skip
        paths[f"pairs_{slug}"] = pair_plots.plot_pair_mrd(
            {p["pair"]: p["mrd"] for p in r["pairs"]}, out / f"pairs_{slug}.png",
            bands={p["pair"]: p["band"] for p in r["pairs"]},
            title=f"MRD of each held pair by MoE layer: {r['name']}")  # fmt: skip
        images += [(paths[f"matrix_{slug}"], f"{r['name']}: MRD matrix per layer"),
                   (paths[f"pairs_{slug}"], f"{r['name']}: held pairs by layer")]  # fmt: skip
        for p in r["pairs"]:
            vals, band = [_nan(v) for v in p["mrd"]], p["band"]
            out_of = sum(1 for v in vals if band and v == v and not band[0] <= v <= band[1])
            rows.append([r["name"], p["pair"], str(tuple(band)) if band else "-",
                         out_of] + vals)  # fmt: skip
    L = max(len(row) - 4 for row in rows)
    flagged = [k for k, row in enumerate(rows) if row[3]]
    return Section("pairs", "Pairs of modalities", [
        "Each pair's MRD (symmetric KL between the two modalities' mean routing distributions) "
        "per MoE layer. In the matrices, grey hatched: a modality absent from the data; a green "
        "frame: a pair held in its band and inside it; a red frame and '!': outside it."],
        images, [Table(["run", "pair", "band", "layers outside"] + [f"layer {i}" for i in
                                                                   range(L)], rows,
                       flagged=flagged)])  # fmt: skip
