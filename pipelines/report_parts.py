"""Pieces of report.html that hold no images: the setup, timings and solver tables, inline SVG plots
(precision-recall curves, per-query AP scatter) and the sortable per-query AP table. Pure HTML
strings from the run's own records; no network, no scripts beyond the table sort."""
from __future__ import annotations

import html
import importlib.metadata
import platform

import numpy as np

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def table(header: list[str], rows: list[list], *, cls: str = "") -> str:
    """An HTML table; floats shown with 2 decimals, everything escaped."""
    def cell(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("numpy", "scipy", "torch", "torchvision", "faiss-cpu", "ray", "pyarrow"):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def setup_html(cfg: dict, ingest: dict | None, q_ingest: dict | None, manifest: dict | None, graph: dict | None,
               distractors: int | None) -> str:
    """Collection sizes, extraction, graph and ranking parameters, and versions."""
    rows = []
    if ingest:
        rows.append(["database", f"{ingest['images']} images ({ingest['rejects']} rejected at ingest)"
                     + (f", {distractors} relevant to no query" if distractors is not None else "")])
    if q_ingest:
        rows.append(["queries", f"{q_ingest['images']} images ({q_ingest['rejects']} rejected)"])
    if manifest:
        rows.append(["descriptors", f"{manifest['n']} x {manifest['dim']}"])
        if "backbone" in manifest:
            rows.append(["network", f"{manifest['backbone']} ({manifest.get('weights', '')}), {manifest.get('pooling')} pooling"
                         + (f" p={manifest.get('gem_p')}" if manifest.get("pooling") == "gem" else "")])
            rows.append(["images", f"longer side {manifest.get('max_side')} px, scales {manifest.get('scales')}"])
            rows.append(["whitening", f"{manifest.get('whitening')}, {manifest.get('whitening_dim')} dims"])
    if graph:
        rows.append(["graph", f"k {graph['k']}, gamma {graph['gamma']}, reciprocal {graph.get('reciprocal')}, {graph['nnz']} edges, "
                     f"{graph['isolated']} isolated, index {graph.get('index', '')}"])
    q = cfg.get("query", {})
    if q:
        rows.append(["ranking", f"methods {', '.join(q.get('methods', []))}; alpha {q.get('alpha')}, kq {q.get('kq')}, rtol {q.get('rtol')}, "
                     f"maxiter {q.get('maxiter')}; aQE alpha {q.get('aqe_alpha')} over {q.get('aqe_n')} neighbours; truncated m "
                     f"{q.get('truncate_m')} ({q.get('truncate_select')})"])
    rows.append(["versions", versions()])
    return "<h2>Setup</h2>" + table(["", "value"], rows, cls="setup")


def timings_html(timings: dict, stats: dict) -> str:
    """Seconds per stage, and per method queries/s and CG iterations/convergence."""
    parts = ["<h2>Timings</h2>"]
    if timings:
        parts.append(table(list(timings), [[float(v) for v in timings.values()]]) + "<p>seconds per stage (latest run of each)</p>")
    if stats:
        rows = [[m, s.get("queries", ""), float(s["queries_per_s"]) if s.get("queries_per_s") else "", f"{s.get('build_seconds', 0):.3f}",
                 f"{s['iterations_mean']:.1f} / {s['iterations_max']}" if "iterations_mean" in s else "-",
                 s.get("not_converged", "-")] for m, s in stats.items() if isinstance(s, dict) and "queries" in s]
        parts.append(table(["method", "queries", "queries/s", "ranker build s", "CG iterations mean / max", "not converged"], rows))
    return "".join(parts)


def results_html(evaluation: dict) -> str:
    """mAP and mP@k per protocol and method (evaluation.json)."""
    methods = evaluation["methods"]
    protos = sorted(next(iter(methods.values())), key=lambda p: {"E": 0, "M": 1, "H": 2}.get(p, 3))
    ks = list(next(iter(next(iter(methods.values())).values()))["mpk"])
    header = ["method"] + [f"{p} {c}" for p in protos for c in ["mAP"] + [f"mP@{k}" for k in ks]]
    rows = [[m] + [float(v) for p in protos for v in [d[p]["map"]] + [d[p]["mpk"][k] for k in ks]] for m, d in methods.items()]
    name = "Revisited protocol: Easy / Medium / Hard" if protos != ["classic"] else "classic protocol"
    return f"<h2>Results</h2><p>In % ({name}); mP@k: mean precision at k.</p>" + table(header, rows)


def _axes(w: int, h: int, pad: int, xlab: str, ylab: str) -> str:
    ticks = "".join(f"<text x='{pad + t * (w - 2 * pad):.0f}' y='{h - pad + 14}' font-size='10' text-anchor='middle'>{t:g}</text>"
                    f"<text x='{pad - 4}' y='{h - pad - t * (h - 2 * pad) + 3:.0f}' font-size='10' text-anchor='end'>{t:g}</text>"
                    for t in (0, 0.5, 1))
    return (f"<rect x='{pad}' y='{pad}' width='{w - 2 * pad}' height='{h - 2 * pad}' fill='none' stroke='#999'/>{ticks}"
            f"<text x='{w / 2:.0f}' y='{h - 4}' font-size='11' text-anchor='middle'>{html.escape(xlab)}</text>"
            f"<text x='12' y='{h / 2:.0f}' font-size='11' transform='rotate(-90 12 {h / 2:.0f})' text-anchor='middle'>{html.escape(ylab)}</text>")


def pr_curves_svg(curves: dict[str, tuple[np.ndarray, np.ndarray]], protocol: str) -> str:
    """Mean interpolated precision-recall curves, one polyline per method (values in [0, 1])."""
    w, h, pad = 420, 300, 40
    lines, legend = [], []
    for i, (m, (r, p)) in enumerate(curves.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{pad + x * (w - 2 * pad):.1f},{h - pad - y * (h - 2 * pad):.1f}" for x, y in zip(r, p))
        lines.append(f"<polyline fill='none' stroke='{c}' stroke-width='2' points='{pts}'><title>{html.escape(m)}</title></polyline>")
        legend.append(f"<text x='{w - pad - 4}' y='{pad + 14 + 13 * i}' font-size='11' fill='{c}' text-anchor='end'>{html.escape(m)}</text>")
    return (f"<svg class='plot' width='{w}' height='{h}'>{_axes(w, h, pad, 'recall', 'precision')}{''.join(lines)}{''.join(legend)}"
            f"<text x='{pad}' y='{pad - 8}' font-size='12'>precision-recall ({html.escape(protocol)})</text></svg>")


def ap_scatter_svg(a: np.ndarray, b: np.ndarray, names: list[str], xlab: str, ylab: str) -> str:
    """Per-query AP (%) of two methods, one dot per query (title: its key), the diagonal drawn."""
    w = h = 300
    pad = 40
    side = w - 2 * pad
    dots = "".join(f"<circle cx='{pad + x / 100 * side:.1f}' cy='{h - pad - y / 100 * side:.1f}' r='3' fill='{'#2ca02c' if y > x else '#d62728' if y < x else '#777'}' "
                   f"fill-opacity='0.7'><title>{html.escape(n)}: {x:.1f} -> {y:.1f}</title></circle>"
                   for x, y, n in zip(a, b, names) if np.isfinite(x) and np.isfinite(y))
    diag = f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{pad}' stroke='#bbb' stroke-dasharray='4'/>"
    up, down = int(np.sum(b > a)), int(np.sum(b < a))
    return (f"<svg class='plot' width='{w}' height='{h}'>{_axes(w, h, pad, xlab + ' AP', ylab + ' AP')}{diag}{dots}"
            f"<text x='{pad}' y='{pad - 8}' font-size='12'>per-query AP: {up} up, {down} down</text></svg>")


SORT_JS = """<script>
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
      return dir * (isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""


def per_query_table(qkeys: list[str], aps: dict[str, list[float]]) -> str:
    """Every query's AP (%) under every method; click a header to sort."""
    methods = list(aps)
    rows = [[q] + [float(aps[m][i]) if np.isfinite(aps[m][i]) else "-" for m in methods] for i, q in enumerate(qkeys)]
    return ("<h2>Per-query AP</h2><p>AP (%) of every query; click a column to sort.</p>"
            + table(["query"] + methods, rows, cls="sortable") + SORT_JS)


def line_plot_svg(series: dict[str, list[tuple[float, float]]], xlab: str, ylab: str, title: str, *, log_x: bool = False) -> str:
    """Small line plot: one polyline per series of (x, y) points, y in % (0-100 axis fitted to the data)."""
    w, h, pad = 340, 220, 40
    pts_all = [p for s in series.values() for p in s]
    if not pts_all:
        return ""
    tx = (lambda x: np.log10(x)) if log_x else (lambda x: x)
    xs, ys = [tx(x) for x, _ in pts_all], [y for _, y in pts_all]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = np.floor(min(ys) - 1), np.ceil(max(ys) + 1)
    fx = lambda x: pad + (tx(x) - x0) / (x1 - x0) * (w - 2 * pad)  # noqa: E731
    fy = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    lines = []
    for i, (name, pts) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        poly = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in sorted(pts))
        dots = "".join(f"<circle cx='{fx(x):.1f}' cy='{fy(y):.1f}' r='2.5' fill='{c}'><title>{html.escape(name)}: {x:g} -> {y:.2f}</title></circle>"
                       for x, y in pts)
        lines.append(f"<polyline fill='none' stroke='{c}' stroke-width='2' points='{poly}'/>{dots}"
                     f"<text x='{w - pad}' y='{pad + 12 * i + 4}' font-size='10' fill='{c}' text-anchor='end'>{html.escape(name)}</text>")
    xt = sorted({x for x, _ in pts_all})
    ticks = "".join(f"<text x='{fx(x):.0f}' y='{h - pad + 13}' font-size='9' text-anchor='middle'>{x:g}</text>" for x in xt)
    yt = f"<text x='{pad - 4}' y='{fy(y0) + 3:.0f}' font-size='9' text-anchor='end'>{y0:g}</text><text x='{pad - 4}' y='{fy(y1) + 3:.0f}' font-size='9' text-anchor='end'>{y1:g}</text>"
    return (f"<svg class='plot' width='{w}' height='{h}'><rect x='{pad}' y='{pad}' width='{w - 2 * pad}' height='{h - 2 * pad}' fill='none' stroke='#999'/>"
            f"{ticks}{yt}{''.join(lines)}<text x='{pad}' y='{pad - 8}' font-size='12'>{html.escape(title)}</text>"
            f"<text x='{w / 2:.0f}' y='{h - 4}' font-size='11' text-anchor='middle'>{html.escape(xlab)}</text>"
            f"<text x='12' y='{h / 2:.0f}' font-size='11' transform='rotate(-90 12 {h / 2:.0f})' text-anchor='middle'>{html.escape(ylab)}</text></svg>")


def sweeps_html(sweeps: dict) -> str:
    """The parameter sweeps of `pipelines.benchmarks.sweeps` (RUN/sweeps.json): Medium mAP against
    whitening dims (per shrinkage), graph k (per kq) and alpha, plotted and tabulated."""
    if not sweeps:
        return ""
    plots, tables = [], []
    wh = sweeps.get("whitening") or []
    if wh:
        series = {f"shrinkage {s}": [(r["dims"], r["M"]) for r in wh if r["shrinkage"] == s] for s in sorted({r["shrinkage"] for r in wh})}
        plots.append(line_plot_svg(series, "whitening dims", "M mAP (kNN)", "PCA-whitening", log_x=True))
        tables.append(table(["dims", "shrinkage", "E", "M", "H"], [[r["dims"], r["shrinkage"], float(r["E"]), float(r["M"]), float(r["H"])] for r in wh]))
    gr = sweeps.get("graph") or []
    if gr:
        series = {f"kq {q}": [(r["k"], r["M"]) for r in gr if r["kq"] == q] for q in sorted({r["kq"] for r in gr})}
        plots.append(line_plot_svg(series, "graph k", "M mAP (diffusion)", "graph k"))
        tables.append(table(["k", "kq", "isolated", "E", "M", "H"], [[r["k"], r["kq"], r["isolated"], float(r["E"]), float(r["M"]), float(r["H"])] for r in gr]))
    al = sweeps.get("alpha") or []
    if al:
        plots.append(line_plot_svg({f"k {al[0]['k']}": [(r["alpha"], r["M"]) for r in al]}, "alpha", "M mAP (diffusion)", "alpha"))
        tables.append(table(["alpha", "E", "M", "H"], [[r["alpha"], float(r["E"]), float(r["M"]), float(r["H"])] for r in al]))
    return ("<h2>Parameter sweeps</h2><p>From <code>python -m pipelines.benchmarks.sweeps</code> on this run (mAP %).</p>"
            + "".join(plots) + "<details><summary>tables</summary>" + "".join(tables) + "</details>")
