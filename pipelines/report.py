"""report.html: the mAP table and, for a few queries, the query crop beside its top results."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from .groundtruth import GroundTruth
from .shards import list_shards, read_table, write_bytes

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


def write_report(
    run_dir: Path,
    metrics: dict,
    gt: GroundTruth,
    *,
    db_keys: list[str],
    query_dir: Path,
    n_queries: int = 6,
    topk: int = 10,
    methods: tuple[str, ...] = ("knn", "diffusion"),
    aps: dict[str, list[float]] | None = None,
    extra_html: str = "",
) -> Path:
    """Write `run_dir/report.html` (self-contained: thumbnails are embedded).

    `aps` (method -> per-query AP in %, queries in rank-file order) picks the example queries:
    half where the methods differ most, half where the last method does worst.
    """
    ranks = {}
    for m in methods:
        p = run_dir / "ranks" / f"{m}.parquet"
        if p.is_file():
            t = read_table(p, ["query", "ids"])
            ranks[m] = (t.column("query").to_pylist(), [np.asarray(r[:topk]) for r in t.column("ids").to_pylist()])
    first = next(iter(ranks.values()), ([], []))
    qkeys = first[0]
    chosen = choose_queries(qkeys, aps or {}, methods, n_queries)
    want_db = {db_keys[i] for m in ranks.values() for q, r in zip(*m) if q in chosen for i in r}
    db_imgs = _images_by_key(run_dir / "images", want_db)
    q_imgs = _images_by_key(query_dir / "images", set(chosen))
    index = {n: i for i, n in enumerate(gt.imlist)}
    qindex = {n: i for i, n in enumerate(gt.qimlist)}

    def label(qkey: str, dbkey: str) -> str:
        g = gt.gnd[qindex[qkey]] if qkey in qindex else {}
        i = index.get(dbkey, -1)
        for lab in ("easy", "hard", "ok", "junk"):
            if i in g.get(lab, ()):
                return lab
        return "wrong"

    cols = list(next(iter(metrics.values())).keys()) if metrics else []
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{v[c]:.2f}</td>" for c in cols) + "</tr>" for m, v in metrics.items()
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Retrieval report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}",
        "img{margin:2px;vertical-align:middle} .q{border:4px solid #1f77b4} .row{margin:6px 0;white-space:nowrap} .lab{display:inline-block;width:90px}",
        "</style></head><body><h1>Retrieval report</h1>",
        f"<p>Run directory: <code>{html.escape(str(run_dir))}</code>. mAP in % ({'Revisited protocol: Easy / Medium / Hard' if gt.protocol == 'revisited' else 'classic protocol'}).</p>",
        "<table><tr><th>method</th>" + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table>",
        extra_html,
        "<h2>Example queries</h2><p>Blue: query crop. Border of each result: "
        "<span style='color:#1a9c3e'>green = relevant (easy/hard)</span>, <span style='color:#d62728'>red = wrong</span>, "
        "<span style='color:#9a9a9a'>grey = junk (ignored)</span>.</p>",
    ]
    for q in chosen:
        if q not in q_imgs:
            continue
        data, box = q_imgs[q]
        qi = qkeys.index(q)
        ap_txt = ", ".join(f"{m} {aps[m][qi]:.1f}" for m in ranks if aps and m in aps)
        parts.append(f"<h3>{html.escape(q)}</h3><p>AP (%): {ap_txt}</p><div><img class='q' src='{_thumb(data, bbox=box)}' title='{html.escape(q)}'></div>")
        for m, (mq, mr) in ranks.items():
            r = mr[mq.index(q)]
            cells = []
            for i in r:
                k = db_keys[i]
                if k in db_imgs:
                    lab = label(q, k)
                    cells.append(f"<img src='{_thumb(db_imgs[k][0], size=90)}' title='{html.escape(k)} ({lab})' style='border:4px solid {COLORS[lab]}'>")
            parts.append(f"<div class='row'><span class='lab'>{html.escape(m)}</span>{''.join(cells)}</div>")
    parts.append("</body></html>")
    path = run_dir / "report.html"
    write_bytes("\n".join(parts).encode(), path)
    return path


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
