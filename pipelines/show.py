"""`retrieval show RUN`: what a run directory holds, stage by stage, read from its own files.

    retrieval show runs/demo

Prints one line per stage (done or not, sizes, timings), the mAP table when the run was evaluated,
where the report and the ranks are, and the stage to run next when the run is incomplete.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from .shards import read_json_or


def run_summary(run_dir: str | Path) -> list[str]:
    """Lines describing the run in `run_dir`; FileNotFoundError when it is not a folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"show: {run} is not a run directory")
    lines = [f"run {run.resolve()}"]
    timings: dict = {}
    timings.update(read_json_or(run / "timings.json", {}))
    took = lambda stage: f" ({timings[stage]:.1f} s)" if stage in timings else ""  # noqa: E731
    nxt = None

    ing = read_json_or(run / "ingest.json")
    q_ing = read_json_or(run / "queries" / "ingest.json")
    if ing:
        q = f"; queries {q_ing['images']} ({q_ing['rejects']} rejected)" if q_ing else ""
        lines.append(f"  ingest    done{took('ingest')}: {ing['images']} images in {ing['shards']} shards, {ing['rejects']} rejected "
                     f"(rejects.parquet), from {ing.get('source_abs', ing['source'])}{q}")
    man = read_json_or(run / "manifest.json")
    if man:
        qm = read_json_or(run / "queries" / "manifest.json")
        how = f"{man.get('backbone', 'imported')} {man.get('pooling', '')} {man.get('max_side', '')} px, whitening {man.get('whitening', 'none')}"
        lines.append(f"  extract   done{took('extract')}: {man['n']} x {man['dim']} descriptors ({' '.join(how.split())})"
                     + (f"; queries {qm['n']}" if qm else ""))
    elif ing:
        nxt = nxt or "extract"
        lines.append("  extract   not run")
    else:
        nxt = nxt or "ingest"
        lines.append("  ingest    not run")
    g = read_json_or(run / "graph" / "manifest.json")
    if g:
        lines.append(f"  graph     done{took('graph')}: n {g['n']}, k {g['k']}, gamma {g['gamma']}, {g['nnz']} edges, "
                     f"{g['isolated']} isolated")
    else:
        nxt = nxt or "graph"
        lines.append("  graph     not run")
    ranks = sorted((run / "ranks").glob("*.parquet"))
    if ranks:
        rows = {p.stem: pq.read_metadata(p).num_rows for p in ranks}
        lines.append(f"  query     done{took('query')}: {', '.join(f'{m} ({n} queries)' for m, n in rows.items())} in "
                     f"{run / 'ranks'}; ranked keys: pipelines.query.read_ranks(RUN, METHOD)")
    else:
        nxt = nxt or "query"
        lines.append("  query     not run" + ("" if (run / "queries").is_dir() else " (no queries ingested)"))
    metrics = read_json_or(run / "metrics.json")
    if metrics:
        from .evaluate import format_table

        lines.append(f"  evaluate  done{took('evaluate')}: mAP (%)")
        lines += ["    " + ln for ln in format_table(metrics).splitlines()]
    else:
        lines.append("  evaluate  not run (needs [dataset].gnd: ground truth)")
    report = run / "report.html"
    lines.append(f"report: {report}" if report.is_file() else "report: none yet")
    if nxt:
        lines.append(f"next: retrieval {nxt} CONFIG (or retrieval run CONFIG)")
    return lines
