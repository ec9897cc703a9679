"""The experiment's results page: mAP, stage time, peak memory and queries/s against database size."""
from __future__ import annotations

import html

from .report_parts import line_plot_svg

PROTOCOL_NAMES = {"E": "Easy", "M": "Medium", "H": "Hard", "classic": "classic"}


def results_html(records: list[dict]) -> str:
    """One self-contained HTML page from the level records of `pipelines.experiment.run_experiment`."""
    if not records:
        return "<html><body><p>no level finished yet</p></body></html>"
    methods = sorted({m for r in records for m in r["metrics"]})
    protocols = [p for p in ("E", "M", "H", "classic") if any(p in e for r in records for e in r["metrics"].values())]
    plots = []
    for p in protocols:
        series = {m: [(r["database"], r["metrics"][m][p]["map"]) for r in records if p in r["metrics"].get(m, {})] for m in methods}
        plots.append(line_plot_svg(series, "database images", "mAP %", f"mAP ({PROTOCOL_NAMES[p]}) vs database size", log_x=True))
    stages = sorted({s for r in records for s in r["stages"]})
    plots.append(line_plot_svg({s: [(r["database"], r["stages"][s]["seconds"]) for r in records if s in r["stages"]] for s in stages},
                               "database images", "seconds", "stage time vs database size", log_x=True))
    plots.append(line_plot_svg({s: [(r["database"], r["stages"][s]["peak_rss_gib"]) for r in records if s in r["stages"]] for s in stages},
                               "database images", "GiB", "peak memory per stage", log_x=True))
    plots.append(line_plot_svg({m: [(r["database"], q) for r in records if (q := r["queries_per_s"].get(m))] for m in methods},
                               "database images", "queries/s", "queries per second vs database size", log_x=True))
    rows = []
    for r in records:
        snap = html.escape(r["snapshot"])
        links = f"<a href='{snap}/report.html'>report</a> · <a href='{snap}/config.resolved.json'>config</a> · <a href='{snap}.json'>record</a>"
        d = r.get("distraction", {})
        near = (f"{d['nearest_positive']['median']:.3f} / {d['nearest_distractor']['median']:.3f} "
                f"({100 * d['queries_distractor_first']:.0f}% distractor first)") if "nearest_positive" in d else "-"
        dup = d.get("near_duplicate_groups", {})
        sets = d.get("near_duplicate_sets", {})
        dups = (f"{dup['groups']} linked groups, largest {dup['largest']}"
                + (f" (its pairs: median {dup['largest_pairwise']['median']:.2f})" if dup.get("largest_pairwise") else "")
                + (f"; {sets['groups']} sets around a centre, largest {sets['largest']}" if sets else "")) if dup else "-"
        maps = " ".join(f"{m} {r['metrics'][m]['H' if 'H' in r['metrics'][m] else next(iter(r['metrics'][m]))]['map']:.2f}" for m in methods)
        ex = r.get("extraction") or {}
        rate = (f"{ex['img_s']:.1f} img/s"
                + (f", {ex['model_ratio']:.3f}x of the model actors' own forward rate meanwhile" if ex.get("model_ratio") else "")
                + (f", {ex['ratio']:.2f}x of the forward pass alone" if ex.get("ratio") else "")
                + (f" ({ex['steady_ratio']:.2f}x after start-up)" if ex.get("steady_ratio") else "")
                + (f"; OS.EGM pass {ex['os_img_s']:.1f} img/s, region index {ex['regions_s'] or 0:.1f} s" if ex.get("os_img_s") else "")
                ) if ex.get("img_s") else "-"
        rows.append([r["level"], r["database"], maps, near, dups, rate, links])
    head = ["distractors", "database", "mAP (Hard, or the protocol's)", "median nearest positive / distractor", "near-duplicates",
            "extraction of the level's new images", "run"]
    tab = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
           + "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r[:-1]) + f"<td>{r[-1]}</td></tr>" for r in rows)
           + "</table>")
    return ("<html><head><meta charset='utf-8'><title>scaling experiment</title><style>body{font-family:sans-serif}"
            "svg.plot{margin:6px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
            f"<h1>Scaling experiment</h1><div>{''.join(plots)}</div><h2>Levels</h2>{tab}"
            f"<p>Every level's run directory: {html.escape(records[-1]['run'])} (it grows level by level; each level's "
            "metrics, report and configuration are kept in its snapshot folder).</p></body></html>")
