"""One self-contained HTML report of an evaluation: the numbers, the map, and what search returns.

Inputs: the harness's ``results.json`` (``evaluate.evaluate_all``), an embedding file from
``item-embed embed`` (the gallery: every product's joint embedding, with the catalog's columns)
and the catalog (for the pictures). Optionally the model that wrote the embeddings, to show the
same queries asked with the image alone or the title alone.

Sections: baseline comparison (the primary model, ITEm, against every other featurizer), a 2-D
map of the embeddings (PCA then t-SNE on a sample, coloured by a label), retrieval examples
(query, then the top k with scores, hit or miss by group), and the full metric tables. Figures
are PNG and thumbnails JPEG, embedded as data URIs: the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

RETRIEVAL_MODES = ("joint", "image", "title", "image2image", "title2image")
RETRIEVAL_METRICS = ("R@1", "R@10", "MAP@R")
QUERY_MODES = ("joint", "image", "title")
TOP_CLASSES = 12  # map colours: the most frequent classes, the rest grey
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#393b79", "#ad494a", "#637939")


# --------------------------------------------------------------------------------------------
# Computations (pure)
# --------------------------------------------------------------------------------------------


def primary_feature(results: dict, primary: str | None = None) -> str | None:
    """The featurizer the others are compared with: ``primary``, else the first ``item*`` one, else
    the first listed."""
    names = list(results.get("features", {}))
    if primary is not None:
        if primary not in names:
            raise ValueError(f"--primary {primary!r} is not in the results (features: {', '.join(names)})")
        return primary
    return next((n for n in names if n.startswith("item")), names[0] if names else None)


def embedding_map(emb: np.ndarray, sample: int = 3000, seed: int = 0,
                  pca_dim: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE coordinates of a seeded sample of rows.

    emb: (n, d). Returns (rows (m,) sorted row numbers, xy (m, 2)), m = min(n, sample). PCA to
    ``pca_dim`` first (t-SNE's usual preprocessing; also faster); perplexity shrinks for tiny samples.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(emb)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, sample, replace=False)) if n > sample else np.arange(n)
    x = emb[rows].astype(np.float32)
    if len(rows) < 3:
        return rows, np.zeros((len(rows), 2), dtype=np.float32)
    k = min(pca_dim, x.shape[1], len(rows) - 1)
    if k < x.shape[1]:
        x = PCA(k, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
    # One OpenMP thread: on the shared 2-core machine t-SNE of 3000 points took 13 s with one and
    # 43 s with two (the threads spin against other processes; 60 points: 0.1 s vs 5-15 s).
    with threadpool_limits(1):
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return rows, xy.astype(np.float32)


@dataclass
class Hit:
    row: int  # gallery row
    score: float  # cosine similarity
    same_group: bool


@dataclass
class Example:
    row: int  # query's gallery row
    mode: str
    hits: list[Hit]


def choose_queries(groups: Sequence, n: int, seed: int = 0, eligible: np.ndarray | None = None) -> np.ndarray:
    """``n`` seeded query rows among products whose group has >= 2 members (and ``eligible``)."""
    codes = pd.factorize(pd.Series(groups).astype(str))[0]
    ok = np.bincount(codes)[codes] >= 2
    if eligible is not None:
        ok &= eligible
    rows = np.flatnonzero(ok)
    if len(rows) > n:
        rows = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    return rows


def retrieval_examples(queries: np.ndarray, gallery: np.ndarray, groups: Sequence, query_rows: np.ndarray,
                       mode: str = "joint", k: int = 5) -> list[Example]:
    """Top ``k`` of each query over the gallery, itself excluded (as the benchmark ranks).

    queries: (q, d) L2-normalised; gallery: (n, d); groups: (n,); query_rows: (q,) gallery row of
    each query. Ties go to the earlier gallery row (stable sort), as in ``evaluate.retrieval_metrics``.
    """
    groups = np.asarray(pd.Series(groups).astype(str))
    sims = queries @ gallery.T  # (q, n)
    sims[np.arange(len(query_rows)), query_rows] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [Example(int(q), mode, [Hit(int(j), float(sims[i, j]), bool(groups[j] == groups[q])) for j in order[i]])
            for i, q in enumerate(query_rows)]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def plot_map(xy: np.ndarray, labels: Sequence | None, title: str) -> bytes:
    """Scatter of the 2-D map as PNG bytes; the most frequent ``TOP_CLASSES`` labels get colours."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(9.5, 6.2))
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=9, c="#1f77b4", alpha=0.7, linewidths=0)
    else:
        lab = pd.Series(labels).astype("string").fillna("(none)").to_numpy(dtype=object)
        counts = pd.Series(lab).value_counts()
        top = list(counts.index[:TOP_CLASSES])
        rest = ~np.isin(lab, top)
        handles = []
        if rest.any():  # drawn first (underneath), listed last
            k = len(counts) - len(top)
            handles.append(ax.scatter(xy[rest, 0], xy[rest, 1], s=7, c="#c8c8c8", alpha=0.6, linewidths=0,
                                      label=f"other: {k} class{'es' if k > 1 else ''} ({rest.sum()})"))
        for name, colour in zip(top, PALETTE):
            m = lab == name
            handles.insert(len(handles) - int(rest.any()),
                           ax.scatter(xy[m, 0], xy[m, 1], s=10, c=colour, alpha=0.8, linewidths=0,
                                      label=f"{name} ({m.sum()})"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9,
                  markerscale=1.6)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_axis_off()  # t-SNE axes carry no units
    return _png(fig)


def plot_comparison(results: dict, primary: str | None, metric: str = "R@1") -> bytes | None:
    """Grouped bars: ``metric`` per retrieval mode, one bar per featurizer (PNG bytes), or None."""
    from matplotlib.figure import Figure

    feats = results.get("features", {})
    modes = [m for m in RETRIEVAL_MODES if any(m in f.get("retrieval", {}) for f in feats.values())]
    if not modes:
        return None
    names = list(feats)
    fig = Figure(figsize=(9.5, 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    others = iter(PALETTE[1:])
    for i, name in enumerate(names):
        vals = [feats[name].get("retrieval", {}).get(m, {}).get(metric, np.nan) for m in modes]
        x = np.arange(len(modes)) + (i - (len(names) - 1) / 2) * width
        colour = PALETTE[0] if name == primary else next(others, "#999999")
        bars = ax.bar(x, np.nan_to_num(vals, nan=0.0), width * 0.92, color=colour, label=name,
                      edgecolor="#1a1a1a" if name == primary else "none", linewidth=0.8)
        for b, v in zip(bars, vals):
            if np.isnan(v):
                b.set_alpha(0.0)
    ax.set_xticks(np.arange(len(modes)), [f"{m} queries" for m in modes])
    ax.set_ylim(0, 1.0)
    ax.set_ylabel(metric)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _png(fig)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(value: Any, image_root: Path | None, size: int = 112) -> str | None:
    """A product photo as a padded ``size`` px JPEG data URI (None when absent or unreadable)."""
    from PIL import Image

    from ..data.images import ImageError, load_image_array

    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    try:
        arr = load_image_array(value, size, image_root)
    except ImageError:
        return None
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

CSS = """
:root { --fg:#1d232b; --muted:#67707c; --line:#e3e6ea; --bg:#f6f7f9; --card:#fff; --accent:#1f5fbf;
        --good:#157a3c; --bad:#b3261e; --goodbg:#e5f4ea; --badbg:#fbe9e7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
       "Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 28px 60px; }
h1 { font-size:24px; margin:0 0 4px; }
h2 { font-size:18px; margin:34px 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:20px 0 8px; }
p.note, .meta { color:var(--muted); margin:4px 0 10px; }
.meta code, p.note code { background:#eceef1; padding:1px 4px; border-radius:3px; font-size:12.5px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; margin:10px 0; }
.facts { display:flex; flex-wrap:wrap; gap:10px; margin:14px 0 0; }
.fact { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:130px; }
.fact b { display:block; font-size:18px; }
.fact span { color:var(--muted); font-size:12px; }
pre.cmd { background:#1f2430; color:#e8eaed; padding:8px 12px; border-radius:6px; overflow-x:auto; font-size:12px;
          margin:6px 0; white-space:pre-wrap; word-break:break-all; }
table { border-collapse:collapse; width:100%; background:var(--card); font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f0f2f5; font-weight:600; font-size:12.5px; }
thead tr.group th { border-bottom:none; text-align:center; color:var(--muted); font-weight:500; }
th:first-child, td:first-child, td.txt, th.txt { text-align:left; }
tr.primary td { background:#eef4fd; font-weight:600; }
td.best { font-weight:700; }
td.na { color:#b0b5bc; }
.delta { display:block; font-size:11px; font-weight:500; }
.delta.up { color:var(--good); } .delta.down { color:var(--bad); }
.table-wrap { overflow-x:auto; border:1px solid var(--line); border-radius:8px; }
.table-wrap table { border:none; }
.table-wrap.compact { display:inline-block; max-width:100%; }
.table-wrap.compact td, .table-wrap.compact th { padding:6px 16px; }
img.fig { max-width:100%; display:block; }
.example { display:grid; grid-template-columns:170px repeat(var(--k), minmax(0, 1fr)); gap:8px; align-items:start;
           background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px; margin:10px 0; }
.item { font-size:12px; min-width:0; }
.item .ph { width:100%; aspect-ratio:1; background:#fafafa; border:1px solid var(--line); border-radius:6px;
            display:flex; align-items:center; justify-content:center; overflow:hidden; color:#b0b5bc; font-size:11px; }
.item .ph img { width:100%; height:100%; object-fit:contain; }
.item .title { margin-top:4px; overflow:hidden; display:-webkit-box; -webkit-line-clamp:3; -webkit-box-orient:vertical;
               word-break:break-word; }
.item .sub { color:var(--muted); font-size:11px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.query { border-right:2px solid var(--line); padding-right:10px; }
.query .sub { white-space:normal; overflow-wrap:anywhere; }
.query .tag { display:inline-block; background:#1f2430; color:#fff; border-radius:3px; padding:0 6px; font-size:11px;
              margin-bottom:4px; }
.badge { display:inline-block; border-radius:3px; padding:0 5px; font-size:11px; font-weight:600; }
.badge.hit { background:var(--goodbg); color:var(--good); } .badge.miss { background:var(--badbg); color:var(--bad); }
.item.hit .ph { border:3px solid #3fa45f; background:#f3faf5; }
.muted { color:var(--muted); }
.hidden-input { opacity:0.35; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.3f}"


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], group_row: str = "", row_classes=None,
           compact: bool = False) -> str:
    """Cells are HTML already (escape before); a cell starting with ``<td`` / ``<th`` is used as is."""
    head = "".join(h if h.startswith("<th") else f"<th>{h}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>")
    wrap = "table-wrap compact" if compact else "table-wrap"
    return (f'<div class="{wrap}"><table><thead>{group_row}<tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _best_cells(columns: list[list[Any]]) -> list[set[int]]:
    """Row indices holding each column's maximum (ignoring missing values)."""
    out = []
    for col in columns:
        vals = [v for v in col if isinstance(v, (int, float)) and not np.isnan(v)]
        top = max(vals) if vals else None
        out.append({i for i, v in enumerate(col) if top is not None and v == top and len(vals) > 1})
    return out


def comparison_section(results: dict, primary: str | None) -> str:
    """ITEm against each featurizer: R@1 per retrieval mode and linear-probe accuracy per label."""
    feats = results.get("features", {})
    if not feats:
        return "<p class='note'>No features in the results.</p>"
    names = list(feats)
    modes = [m for m in RETRIEVAL_MODES if any(m in f.get("retrieval", {}) for f in feats.values())]
    labels = list(dict.fromkeys(lab for f in feats.values() for lab in f.get("probe", {})))
    cols = [("retrieval", m, "R@1") for m in modes] + [("probe", lab, "linear") for lab in labels]
    pick = lambda f, kind, m: (_get(f, "retrieval", m, "R@1") if kind == "retrieval"  # noqa: E731
                               else _get(f, "probe", m, "linear", "accuracy"))
    values = [[pick(feats[n], kind, m) for n in names] for kind, m, _ in cols]
    best = _best_cells(values)
    rows, classes = [], []
    for i, n in enumerate(names):
        cells = [f'<td class="txt">{_e(n)}</td>']
        for j in range(len(cols)):
            v = values[j][i]
            p = values[j][names.index(primary)] if primary in names else None
            klass = "na" if v is None else ("best" if i in best[j] else "")
            delta = ""
            if n != primary and v is not None and p is not None:
                d = p - v
                sign = "up" if d > 0 else "down" if d < 0 else ""
                delta = f'<span class="delta {sign}">{_e(primary)} {d:+.3f}</span>'
            cells.append(f'<td class="{klass}">{_num(v)}{delta}</td>')
        rows.append(cells)
        classes.append("primary" if n == primary else "")
    group = "<tr class='group'><th></th>"
    if modes:
        group += f"<th colspan='{len(modes)}'>same-product retrieval, R@1</th>"
    if labels:
        group += f"<th colspan='{len(labels)}'>category, linear-probe accuracy</th>"
    group += "</tr>"
    headers = ["features"] + [f"{m} queries" for m in modes] + [_e(lab) for lab in labels]
    note = (f"<p class='note'>Bold: best in the column. Under each other feature, <b>{_e(primary)}</b> minus it "
            "(green: ahead, red: behind). Retrieval galleries hold every product embedded with all it has; "
            "<code>image</code> / <code>title</code> queries give one modality, <code>image2image</code> embeds both "
            "sides from the image alone.</p>") if primary else ""
    return _table(headers, rows, group, classes) + note


def _score_rows(names: list[str], values: list[list]) -> list[list[str]]:
    """Table cells, a row per featurizer: its name, then each column's value (``values[column][row]``),
    the best of each column marked."""
    best = _best_cells(values)
    rows = []
    for i, n in enumerate(names):
        cells = [f'<td class="txt">{_e(n)}</td>']
        for j, col in enumerate(values):
            v = col[i]
            cells.append(f'<td class="{"na" if v is None else "best" if i in best[j] else ""}">{_num(v)}</td>')
        rows.append(cells)
    return rows


def retrieval_table(results: dict, primary: str | None) -> str:
    feats = results.get("features", {})
    modes = [m for m in RETRIEVAL_MODES if any(m in f.get("retrieval", {}) for f in feats.values())]
    if not modes:
        return "<p class='note'>No retrieval results (the evaluation had no group column).</p>"
    names = list(feats)
    values = [[_get(feats[n], "retrieval", m, k) for n in names] for m in modes for k in RETRIEVAL_METRICS]
    rows = _score_rows(names, values)
    group = "<tr class='group'><th></th>" + "".join(
        f"<th colspan='{len(RETRIEVAL_METRICS)}'>{_e(m)} queries</th>" for m in modes) + "</tr>"
    headers = ["features"] + [k for _ in modes for k in RETRIEVAL_METRICS]
    queries = {m: next((f["retrieval"][m]["queries"] for f in feats.values() if m in f.get("retrieval", {})), None)
               for m in modes}
    note = "<p class='note'>Queries per mode: " + ", ".join(f"{_e(m)} {_num(q)}" for m, q in queries.items()) + ".</p>"
    return _table(headers, rows, group, ["primary" if n == primary else "" for n in names]) + note


def probe_table(results: dict, primary: str | None) -> str:
    feats = results.get("features", {})
    labels = list(dict.fromkeys(lab for f in feats.values() for lab in f.get("probe", {})))
    if not labels:
        return "<p class='note'>No category-prediction results (no label columns were evaluated).</p>"
    names = list(feats)
    keys = [("linear", "accuracy"), ("linear", "macro_f1"), ("knn", "accuracy"), ("knn", "macro_f1")]
    values = [[_get(feats[n], "probe", lab, a, b) for n in names] for lab in labels for a, b in keys]
    rows = _score_rows(names, values)
    group = "<tr class='group'><th></th>" + "".join(f"<th colspan='4'>{_e(lab)}</th>" for lab in labels) + "</tr>"
    headers = ["features"] + ["linear acc", "linear F1", "kNN acc", "kNN F1"] * len(labels)
    tests = {lab: next((f["probe"][lab]["linear"].get("test") for f in feats.values() if lab in f.get("probe", {})),
                       None) for lab in labels}
    note = ("<p class='note'>Frozen joint embeddings; 80/20 split by a hash of the group, so variants of one product "
            "never sit on both sides. Linear probe: standardise + logistic regression; kNN: k = 10, cosine. "
            "Test products: " + ", ".join(f"{_e(k)} {_num(v)}" for k, v in tests.items()) + ".</p>")
    return _table(headers, rows, group, ["primary" if n == primary else "" for n in names]) + note


DIAGNOSTICS_HELP = {
    "cls_attention_image": "share of the last layer's [CLS] attention on image patches",
    "cls_attention_text": "share of the last layer's [CLS] attention on text tokens",
    "cos_joint_image": "mean cosine between a product's joint and image-only embeddings",
    "cos_joint_title": "mean cosine between a product's joint and title-only embeddings",
}


def small_tables(results: dict) -> str:
    parts = []
    diag = results.get("diagnostics")
    if diag:
        rows = [[f'<td class="txt">{_e(k)}</td>', _num(v),
                 f'<td class="txt muted">{_e(DIAGNOSTICS_HELP.get(k, ""))}</td>'] for k, v in diag.items()]
        table = _table(["diagnostic", "value", "<th class='txt'>meaning</th>"], rows, compact=True)
        parts.append("<h3>Modality balance of the primary model</h3>" + table)
    secs = results.get("seconds")
    if secs:
        rows = [[f'<td class="txt">{_e(k)}</td>', f"{float(v):.1f}"] for k, v in secs.items()]
        parts.append("<h3>Evaluation wall time</h3>" + _table(["features", "seconds"], rows, compact=True)
                     + "<p class='note'>Fit + embedding + scoring of each featurizer in the harness run.</p>")
    return "".join(parts)


def _item_card(thumb: str | None, title: str | None, sub: str, klass: str = "", badge: str = "",
               hide_image: bool = False, hide_title: bool = False) -> str:
    """A product: picture, optional badge, title, small print. ``hide_*`` fades a part a query left out."""
    ph = f'<img src="{thumb}" alt="">' if thumb else "no image"
    text = _e(title) if title else "<span class=muted>(no title)</span>"
    if hide_title and title:
        text = f'<span class="hidden-input" title="not part of the query">{text}</span>'
    return (f'<div class="item {klass}"><div class="ph{" hidden-input" if hide_image else ""}">{ph}</div>{badge}'
            f'<div class="title">{text}</div><div class="sub">{sub}</div></div>')


def examples_html(examples: list[Example], frame: pd.DataFrame, thumbs: dict[int, str | None], group_col: str,
                  k: int) -> str:
    """One row per query: the query (with what the query used), then its top k as hit / miss cards."""
    titles = frame["title"].tolist() if "title" in frame else [None] * len(frame)
    ids, groups = frame["id"].astype(str).tolist(), frame[group_col].astype(str).tolist()
    out = []
    for ex in examples:
        q = ex.row
        used = {"joint": "image + title", "image": "image only", "title": "title only"}[ex.mode]
        # Both parts of the query product are shown; the one the query left out is faded.
        sub = f"id {_e(ids[q])} · group {_e(groups[q])}"
        query = (f'<div class="query"><span class="tag">query · {used}</span>'
                 + _item_card(thumbs.get(q), titles[q], sub, hide_image=ex.mode == "title",
                              hide_title=ex.mode == "image") + "</div>")
        cards = []
        for rank, h in enumerate(ex.hits, 1):
            badge = (f'<span class="badge {"hit" if h.same_group else "miss"}">#{rank} '
                     f'{"same product" if h.same_group else "other"} · {h.score:.3f}</span>')
            cards.append(_item_card(thumbs.get(h.row), titles[h.row], f"group {_e(groups[h.row])}",
                                    "hit" if h.same_group else "miss", badge))
        n_hits = sum(h.same_group for h in ex.hits)
        out.append(f'<div class="example" style="--k:{k}" data-hits="{n_hits}">{query}{"".join(cards)}</div>')
    return "".join(out)


def render_html(title: str, header: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f'<section id="{_e(sid)}">{content}</section>' for sid, content in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><main>{header}{body}</main></body></html>")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _catalog_images(catalog: str | Path | None, ids: Sequence[str], id_column: str, image_column: str,
                    image_root: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    """id -> raw image value from the catalog (a file or a URI), and the root relative paths start from."""
    from ..data.catalog import Catalog, Columns

    if catalog is None:
        return {}, None
    opened = Catalog.open(catalog, Columns(id=id_column, image=image_column), image_root,
                          read_columns=[id_column, image_column])
    frame = opened.frame
    if id_column not in frame or image_column not in frame:
        raise ValueError(f"catalog {catalog} needs columns {id_column!r} and {image_column!r} for the pictures")
    keys = frame[id_column].astype(str)
    pick = frame.loc[keys.isin(set(ids)), [id_column, image_column]]
    return dict(zip(pick[id_column].astype(str), pick[image_column])), opened.image_root


def _load_encoder(run_dir: str | Path):
    """ITEm's ``ItemEncoder`` or the ``DualEncoder``, whichever ``run_dir`` holds."""
    from ..encode import ItemEncoder
    from ..model.dual import DUAL_FORMAT
    from .dual import DualEncoder

    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    kind = DualEncoder if config.get("format") == DUAL_FORMAT else ItemEncoder
    return kind.from_pretrained(run_dir, device="cpu")


def _query_embeddings(encoder, records: list[dict], mode: str, image_root: Path | None) -> np.ndarray:
    """(q, d) embeddings of records that hold only the mode's input (the dual encoder is told the mode)."""
    from .dual import DualEncoder

    products = [encoder.to_product(r, i, image_root) for i, r in enumerate(records)]
    if isinstance(encoder, DualEncoder):
        return encoder.embed(products, mode)
    return encoder.encode_batched(products)


def _examples_section(frame: pd.DataFrame, emb: np.ndarray, group: str, query_modes: Sequence[str], n: int,
                      top_k: int, seed: int, encoder, images: dict[str, Any], root: Path | None,
                      log: Callable[[str], None]) -> str:
    """The same ``n`` seeded queries asked in each mode, each with its top ``top_k``."""
    if group not in frame:
        return ("<p class='note'>No retrieval examples: the embedding file has no group column "
                f"<code>{_e(group)}</code>.</p>")
    ids = frame["id"].astype(str).to_numpy(dtype=object)
    groups = frame[group].astype("string").fillna("").to_numpy(dtype=object)
    groups = np.where(groups == "", "\x00" + ids, groups)  # no group: a singleton
    eligible = np.ones(len(frame), bool)  # the same queries in every mode: each needs every mode's input
    for col, need in (("has_image", "image"), ("has_title", "title")):
        if col in frame and need in query_modes:
            eligible &= frame[col].to_numpy(dtype=bool)
    qrows = choose_queries(groups, n, seed, eligible)
    titles = frame["title"].tolist() if "title" in frame else [None] * len(frame)
    by_mode: dict[str, list[Example]] = {}
    for mode in query_modes:
        if mode == "joint":
            q = emb[qrows]  # the gallery's own joint embeddings
        elif mode == "image" and not images:
            log("warning: no catalog pictures: image-only example queries left out")
            continue
        else:
            recs = [{"id": ids[r], "image": images.get(ids[r])} if mode == "image"
                    else {"id": ids[r], "title": titles[r]} for r in qrows]
            q = _query_embeddings(encoder, recs, mode, root)
        by_mode[mode] = retrieval_examples(q, emb, groups, qrows, mode, top_k)
    shown = {h.row for exs in by_mode.values() for ex in exs for h in ex.hits} | set(qrows.tolist())
    thumbs = {r: thumbnail_uri(images.get(ids[r]), root) for r in sorted(shown)}
    parts = []
    for mode, exs in by_mode.items():
        hits = sum(h.same_group for ex in exs for h in ex.hits)
        parts.append(f"<h3>{_e(mode)} queries <span class='muted'>· {hits} of {len(exs) * top_k} results "
                     "are the same product</span></h3>" + examples_html(exs, frame, thumbs, group, top_k))
    return ("<p class='note'>Seeded random queries among products with at least one other listing of the same "
            f"product (same <code>{_e(group)}</code>); the gallery is every other product embedded with everything "
            "it has. Green frame: the same product; red badge: another one. In a query card, the faded part is the "
            "one the query left out. Scores are cosine similarities.</p>" + "".join(parts))


def _header(results: dict, primary: str | None, catalog, model, embeddings) -> str:
    feats = results.get("features", {})
    n = results.get("n_products")
    facts = [(f"{n:,}" if isinstance(n, int) else "—", "products evaluated"), (str(len(feats)), "featurizers"),
             (_e(primary or "—"), "primary model")]
    for mode, label in (("joint", "joint R@1"), ("image", "image-query R@1")):
        v = _get(feats.get(primary, {}), "retrieval", mode, "R@1") if primary else None
        if v is not None:
            facts.append((_num(v), label))
    commands = "".join(f"<pre class='cmd'>{_e(c)}</pre>" for c in results.get("commands", []))
    boxes = "".join(f"<div class='fact'><b>{v}</b><span>{_e(k)}</span></div>" for v, k in facts)
    return ("<h1>Product embedding report</h1>"
            f"<div class='meta'>Catalog <code>{_e(results.get('catalog') or catalog or '—')}</code> · model "
            f"<code>{_e(results.get('model') or model or '—')}</code> · embeddings "
            f"<code>{_e(Path(embeddings).name)}</code> · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</div>"
            f"<div class='facts'>{boxes}</div>{commands}")


def _query_modes(query_modes: Sequence[str] | None, model) -> list[str]:
    """The example query modes asked for (default: every one with a model, else joint), checked."""
    modes = list(query_modes or (QUERY_MODES if model else ("joint",)))
    bad = [m for m in modes if m not in QUERY_MODES]
    if bad:
        raise ValueError(f"unknown query mode(s) {', '.join(bad)} (use {', '.join(QUERY_MODES)})")
    if model is None and any(m != "joint" for m in modes):
        raise ValueError("image or title example queries need --model (the run that wrote the embeddings)")
    return modes


def _colour_column(results: dict, frame: pd.DataFrame, color_by: str | None, embeddings) -> str | None:
    """The label column that colours the map: the one asked for, else the first probed label present."""
    probed = list(dict.fromkeys(lab for f in results.get("features", {}).values() for lab in f.get("probe", {})))
    if color_by is None:
        return next((lab for lab in probed if lab in frame), None)
    if color_by not in frame:
        raise ValueError(f"--color-by {color_by!r}: no such column in {embeddings} "
                         f"(columns: {', '.join(map(str, frame.columns))})")
    return color_by


def _sections(results: dict, primary: str, embeddings_name: str, map_title: str, map_png: bytes,
              example_html: str) -> list[tuple[str, str]]:
    """(anchor, HTML) of each section of the page, in order."""
    bars = plot_comparison(results, primary)
    bars_html = (f"<div class='card'><img class='fig' alt='R@1 per query mode' src='{data_uri(bars)}'></div>"
                 if bars is not None else "")
    sections = [
        ("comparison", "<h2>Baseline comparison</h2>" + comparison_section(results, primary) + bars_html),
        ("map", "<h2>Embedding map</h2><p class='note'>PCA to 50 dimensions, then t-SNE (scikit-learn) on a seeded "
                f"sample; the {TOP_CLASSES} most frequent classes in colour. Embeddings: "
                f"<code>{_e(embeddings_name)}</code>.</p>"
                f"<div class='card'><img class='fig' alt='{_e('embedding map: ' + map_title)}' "
                f"src='{data_uri(map_png)}'></div>"),
        ("examples", "<h2>Retrieval examples</h2>" + example_html),
        ("retrieval", "<h2>Same-product retrieval</h2>" + retrieval_table(results, primary)),
        ("probes", "<h2>Category prediction</h2>" + probe_table(results, primary)),
    ]
    extra = small_tables(results)
    if extra:
        sections.append(("more", "<h2>Diagnostics</h2>" + extra))
    return sections


def build_report(
    results: dict | str | Path,
    embeddings: str | Path,
    out: str | Path,
    catalog: str | Path | None = None,
    image_root: str | Path | None = None,
    color_by: str | None = None,
    group: str = "group",
    examples: int = 6,
    top_k: int = 5,
    model: str | Path | None = None,
    query_modes: Sequence[str] | None = None,
    primary: str | None = None,
    sample: int = 3000,
    seed: int = 0,
    id_column: str = "id",
    image_column: str = "image",
    log: Callable[[str], None] = print,
) -> Path:
    """Write the HTML report to ``out`` and return its path.

    results: the harness's results document (or its path); embeddings: an ``item-embed embed``
    file of the primary model (gallery and map; titles from its ``title`` column); catalog: the
    catalog file, for pictures (default: the one recorded in the embedding file). ``color_by``:
    label column of the map (default: the first probed label present). ``model``: the run that
    wrote ``embeddings`` (ITEm or dual); with it the example queries are also asked in
    ``query_modes`` (default joint, image and title), else joint only.
    """
    from ..embeddings import read_embedding_metadata, read_embeddings

    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    frame, emb = read_embeddings(embeddings)
    meta = read_embedding_metadata(embeddings)
    if catalog is None and meta.get("catalog"):
        catalog = meta["catalog"]
        image_root = image_root if image_root is not None else meta.get("image_root")
    if catalog is not None and not Path(catalog).is_file():
        log(f"warning: catalog {catalog} not found: the report has no pictures")
        catalog = None
    primary = primary_feature(results, primary)
    query_modes = _query_modes(query_modes, model)
    color_by = _colour_column(results, frame, color_by, embeddings)
    encoder = _load_encoder(model) if model is not None else None
    if encoder is not None and meta.get("model_id") and meta["model_id"] != encoder.model_id:
        raise ValueError(f"{embeddings} was written by model {meta['model_id']}, not by {model} "
                         f"({encoder.model_id}): give the run that wrote the embeddings")

    log(f"map: t-SNE of {min(len(emb), sample)} of {len(emb)} embeddings")
    rows, xy = embedding_map(emb, sample, seed)
    map_title = f"{len(rows):,} products" + (f" coloured by {color_by}" if color_by else "")
    map_png = plot_map(xy, frame[color_by].to_numpy()[rows] if color_by else None, map_title)
    images, root = _catalog_images(catalog, frame["id"].astype(str).tolist(), id_column, image_column, image_root)
    example_html = _examples_section(frame, emb, group, query_modes, examples, top_k, seed, encoder, images, root, log)

    sections = _sections(results, primary, Path(embeddings).name, map_title, map_png, example_html)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_html("Product embedding report", _header(results, primary, catalog, model, embeddings),
                               sections), encoding="utf-8")
    tmp.replace(out)
    return out
