"""report.html: a run's setup, results, plots, timings and example queries, in one self-contained file."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .groundtruth import GroundTruth
from .shards import list_shards, read_json_or, read_table, write_bytes

COLORS = {"easy": "#1a9c3e", "hard": "#1a9c3e", "ok": "#1a9c3e", "junk": "#9a9a9a", "wrong": "#d62728"}


def _thumb(data: bytes, *, bbox=None, size: int = 120) -> str:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if bbox is not None:
            im = im.crop(tuple(int(round(v)) for v in bbox))
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _images_by_key(folder: Path, keys: set[str]) -> dict[str, tuple[bytes, list | None]]:
    out = {}
    for p in list_shards(folder):
        t = read_table(p, ["key", "image", "bbox"])
        for k, img, box in zip(t.column("key").to_pylist(), t.column("image").to_pylist(), t.column("bbox").to_pylist()):
            if k in keys:
                out[k] = (img, box)
    return out


def choose_queries(qkeys: list[str], aps: dict[str, list[float]], methods: tuple[str, ...], n: int) -> list[str]:
    """Queries worth showing: largest AP change between the first and last method, then the worst."""
    have = [m for m in methods if m in aps]
    if len(have) < 2:
        step = max(1, len(qkeys) // max(n, 1))
        return qkeys[::step][:n]
    a, b = np.nan_to_num(np.asarray(aps[have[0]])), np.nan_to_num(np.asarray(aps[have[-1]]))
    chosen: list[int] = []
    for i in np.argsort(-np.abs(b - a), kind="stable"):
        if len(chosen) >= (n + 1) // 2:
            break
        chosen.append(int(i))
    for i in np.argsort(b, kind="stable"):
        if len(chosen) >= n:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return [qkeys[i] for i in chosen]


def _full_image(data: bytes, bbox=None, size: int = 200) -> str:
    """The whole query image with its box drawn (the crop the query descriptor was taken from)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if bbox is not None:
            ImageDraw.Draw(im).rectangle([float(v) for v in bbox], outline=(31, 119, 180), width=max(2, max(im.size) // 100))
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _ranks(run_dir: Path) -> dict[str, tuple[list[str], list[np.ndarray], list[np.ndarray]]]:
    """method -> (query keys, ranked database ids per query, scores per query), in METHODS order."""
    from retrieval.rankers import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    out = {}
    for p in sorted((run_dir / "ranks").glob("*.parquet"), key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        t = read_table(p, ["query", "ids", "scores"])
        out[p.stem] = (t.column("query").to_pylist(), [np.asarray(r) for r in t.column("ids").to_pylist()],
                       [np.asarray(r) for r in t.column("scores").to_pylist()])
    return out


def write_report(
    run_dir: Path,
    *,
    db_keys: list[str],
    query_dir: Path,
    gt: GroundTruth | None = None,
    evaluation: dict | None = None,
    n_queries: int = 6,
    topk: int = 10,
    extra_html: str = "",
    max_grid: int = 40,
) -> Path:
    """Write `run_dir/report.html`, one self-contained file (images embedded, plots inline SVG).

    Always: the setup (collection sizes, network, graph, ranking parameters, versions), timings and
    solver statistics, and the results of every query (top `topk` keys and scores per method, with
    thumbnails for `n_queries` of them). With ground truth (`gt` and `evaluation.json`'s content):
    mAP and mP@k per protocol, precision-recall curves, per-query AP scatter (first method against
    the last), a sortable per-query AP table, and example grids chosen to show mistakes: each
    method's results down to its first false positive and its last positive (at most `max_grid`).
    """
    from retrieval.metrics import precision_recall_curve, revisited_gnd

    from . import report_parts as rp
    from .evaluate import to_gnd_ranks

    ranks = _ranks(run_dir)
    qkeys = next(iter(ranks.values()))[0] if ranks else []
    methods = list(ranks)
    distractors = None
    if gt is not None:
        relevant = {i for g in gt.gnd for lab in ("easy", "hard", "ok") for i in g.get(lab, ())}
        distractors = len(gt.imlist) - len(relevant)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Retrieval report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1500px} table{border-collapse:collapse;margin:6px 0} "
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} table.setup td{text-align:left} "
        "img{margin:2px;vertical-align:middle} .q{border:4px solid #1f77b4} .row{margin:6px 0;white-space:nowrap;overflow-x:auto} "
        ".lab{display:inline-block;width:90px} .plot{margin-right:12px;border:1px solid #eee} small{color:#555}",
        f"</style></head><body><h1>Retrieval report</h1><p>Run directory: <code>{html.escape(str(run_dir))}</code></p>",
        rp.setup_html(read_json_or(run_dir / "config.resolved.json", {}), read_json_or(run_dir / "ingest.json"),
                      read_json_or(query_dir / "ingest.json"), read_json_or(run_dir / "manifest.json"),
                      read_json_or(run_dir / "graph" / "manifest.json"), distractors),
    ]
    aps: dict[str, list[float]] = {}
    if gt is not None and evaluation:
        parts.append(rp.results_html(evaluation))
        proto = "M" if "M" in next(iter(evaluation["methods"].values())) else "classic"
        aps = {m: d[proto]["aps"] for m, d in evaluation["methods"].items() if m in ranks}
        gnd = revisited_gnd(gt.gnd, "M") if proto == "M" else gt.gnd
        qpos = {k: i for i, k in enumerate(gt.qimlist)}
        curves = {}
        for m, (mq, mids, _) in ranks.items():
            n = min(len(r) for r in mids) if mids else 0
            R = to_gnd_ranks(np.stack([r[:n] for r in mids]), db_keys, gt) if n else np.zeros((0, 0), np.int64)
            curves[m] = precision_recall_curve(R, [gnd[qpos[q]] for q in mq])
        plots = [rp.pr_curves_svg(curves, "Medium" if proto == "M" else "classic")]
        if len(aps) >= 2:
            a, b = list(aps)[0], list(aps)[-1]
            plots.append(rp.ap_scatter_svg(np.asarray(aps[a], float), np.asarray(aps[b], float), qkeys, a, b))
        parts.append("<h2>Plots</h2>" + "".join(plots))
        parts.append(rp.sweeps_html(read_json_or(run_dir / "sweeps.json")))
    parts.append(extra_html)
    parts.append(rp.timings_html(read_json_or(run_dir / "timings.json", {}), read_json_or(run_dir / "ranks" / "stats.json", {})))
    if aps:
        parts.append(rp.per_query_table(qkeys, aps))
    chosen = choose_queries(qkeys, aps, tuple(methods), n_queries)
    parts.append(_examples(run_dir, query_dir, ranks, chosen, db_keys, gt, aps, topk, max_grid))
    parts.append(_browse(ranks, db_keys, topk))
    parts.append("</body></html>")
    path = run_dir / "report.html"
    write_bytes("\n".join(parts).encode(), path)
    return path


def _labels(gt: GroundTruth | None, qkey: str) -> tuple[dict[int, str], dict]:
    """gt index -> label for one query, and the query's ground-truth entry."""
    if gt is None:
        return {}, {}
    g = gt.gnd[gt.qimlist.index(qkey)] if qkey in gt.qimlist else {}
    return {i: lab for lab in ("junk", "hard", "easy", "ok") for i in g.get(lab, ())}, g


def _examples(run_dir: Path, query_dir: Path, ranks: dict, chosen: list[str], db_keys: list[str], gt: GroundTruth | None,
              aps: dict, topk: int, max_grid: int) -> str:
    index = {n: i for i, n in enumerate(gt.imlist)} if gt is not None else {}
    depth: dict[tuple[str, str], int] = {}
    notes: dict[tuple[str, str], str] = {}
    for q in chosen:
        lab_of, g = _labels(gt, q)
        npos = sum(len(g.get(k, ())) for k in ("easy", "hard", "ok"))
        for m, (mq, mids, _) in ranks.items():
            r = mids[mq.index(q)]
            if gt is None:
                depth[(q, m)] = min(topk, len(r))
                continue
            labs = [lab_of.get(index.get(db_keys[i], -1), "wrong") for i in r[:2000]]
            first_wrong = next((j for j, lab in enumerate(labs) if lab == "wrong"), None)
            pos_at = [j for j, lab in enumerate(labs) if lab in ("easy", "hard", "ok")]
            last_pos = pos_at[-1] if pos_at else None
            want = max(topk, (first_wrong or 0) + 1, (last_pos or 0) + 1)
            depth[(q, m)] = min(want, max_grid, len(r))
            notes[(q, m)] = (f"first mistake at rank {first_wrong + 1}" if first_wrong is not None else "no mistake") + (
                f", last of {npos} positives at rank {last_pos + 1}" if last_pos is not None else ", no positive found") + (
                f" (shown to {max_grid})" if want > max_grid else "")
    want_db = {db_keys[i] for q in chosen for m, (mq, mids, _) in ranks.items() for i in mids[mq.index(q)][:depth[(q, m)]]}
    db_imgs = _images_by_key(run_dir / "images", want_db)
    q_imgs = _images_by_key(query_dir / "images", set(chosen))
    parts = ["<h2>Example queries</h2><p>" + ("Chosen to show mistakes: where the methods differ most, then the worst. Each row "
             "runs down to its first false positive and its last positive. Blue: the query image, its box drawn. Border of each "
             "result: <span style='color:#1a9c3e'>green = relevant (easy/hard)</span>, <span style='color:#d62728'>red = wrong</span>, "
             "<span style='color:#9a9a9a'>grey = junk (ignored)</span>." if gt is not None else
             "No ground truth: the top results of a few queries (all queries are listed below with keys and scores).") + "</p>"]
    for q in chosen:
        if q not in q_imgs:
            continue
        data, box = q_imgs[q]
        lab_of, g = _labels(gt, q)
        qi = next(iter(ranks.values()))[0].index(q)
        head = f"<h3>{html.escape(q)}</h3>"
        if gt is not None:
            counts = ", ".join(f"{len(g.get(k, ()))} {k}" for k in ("easy", "hard", "ok", "junk") if k in g)
            ap_txt = ", ".join(f"{m} {aps[m][qi]:.1f}" for m in ranks if m in aps)
            head += f"<p>positives: {counts}; AP (%): {ap_txt}</p>"
        parts.append(head + f"<div><img class='q' src='{_full_image(data, box)}' title='{html.escape(q)}'></div>")
        for m, (mq, mids, mscores) in ranks.items():
            j = mq.index(q)
            cells = []
            for rank, (i, sc) in enumerate(zip(mids[j][:depth[(q, m)]], mscores[j])):
                k = db_keys[i]
                lab = lab_of.get(index.get(k, -1), "wrong") if gt is not None else None
                style = f"border:4px solid {COLORS[lab]}" if lab else "border:1px solid #ccc"
                if k in db_imgs:
                    cells.append(f"<img src='{_thumb(db_imgs[k][0], size=80)}' title='{rank + 1}. {html.escape(k)} {sc:.4f}"
                                 f"{f' ({lab})' if lab else ''}' style='{style}'>")
            note = f"<br><small>{notes[(q, m)]}</small>" if (q, m) in notes else ""
            parts.append(f"<div class='row'><span class='lab'>{html.escape(m)}</span>{''.join(cells)}{note}</div>")
    return "".join(parts)


def _browse(ranks: dict, db_keys: list[str], topk: int) -> str:
    """Every query's top results per method: keys and scores (text, so that it stays small)."""
    if not ranks:
        return "<h2>Results</h2><p>No ranks yet: run the query stage.</p>"
    methods = list(ranks)
    qkeys = ranks[methods[0]][0]
    rows = []
    for j, q in enumerate(qkeys):
        cells = []
        for m in methods:
            mq, mids, msc = ranks[m]
            jj = j if mq[j] == q else mq.index(q)
            cells.append("<br>".join(f"{html.escape(db_keys[i])} <small>{s:.3f}</small>" for i, s in zip(mids[jj][:topk], msc[jj][:topk])))
        rows.append(f"<tr><td style='text-align:left'>{html.escape(q)}</td>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    return (f"<h2>All queries: top {topk}</h2><details><summary>{len(qkeys)} queries x {len(methods)} methods (keys and scores)"
            f"</summary><table><thead><tr><th>query</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></details>")


def _svg_curve(xs: list, ys: list, label: str, colour: str = "#1f77b4") -> str:
    w, h, pad = 360, 160, 30
    lo, hi = min(ys), max(ys)
    span, xspan = (hi - lo) or 1.0, (max(xs) - min(xs)) or 1
    pts = " ".join(f"{pad + (x - min(xs)) / xspan * (w - 2 * pad):.1f},{h - pad - (y - lo) / span * (h - 2 * pad):.1f}"
                   for x, y in zip(xs, ys))
    return (f"<svg width='{w}' height='{h}' style='border:1px solid #ccc;margin-right:8px'><polyline fill='none' stroke='{colour}' "
            f"stroke-width='2' points='{pts}'/><text x='{pad}' y='15' font-size='11'>{html.escape(label)} max {hi:.4g}</text>"
            f"<text x='{pad}' y='{h - 8}' font-size='11'>min {lo:.4g}, epochs {min(xs)}-{max(xs)}</text></svg>")


def training_html(rows: list[dict]) -> str:
    """The fine-tuning log (`train/metrics.jsonl` rows) as inline SVG curves (loss, and validation
    mAP when logged) and a table."""
    if not rows:
        return ""
    ep = [r["epoch"] for r in rows]
    curves = [_svg_curve(ep, [r["loss"] for r in rows], "training loss")]
    val_cols = [c for c in rows[0] if c.startswith("val_")]
    for c in val_cols:
        if all(c in r for r in rows):
            curves.append(_svg_curve(ep, [r[c] for r in rows], f"validation kNN mAP {c[4:]}", "#1a9c3e"))
    cols = [c for c in ("epoch", "loss", *val_cols, "tuples", "tuples_per_s", "mining_seconds", "gem_p", "workers") if c in rows[0]]
    body = "".join("<tr>" + "".join(f"<td>{r[c]:.4g}</td>" if isinstance(r.get(c), float) else f"<td>{r.get(c, '')}</td>"
                                     for c in cols) + "</tr>" for r in rows)
    return (f"<h2>Fine-tuning</h2><p>Per epoch: training loss (tuples mined without labels) and, when a validation "
            f"split is configured, its kNN mAP (%).</p>{''.join(curves)}"
            f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table>")
