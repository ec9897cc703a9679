"""A collection that grows by a fraction: the graph stage's update against a full build, through the
CLI (issue 13). On the scale benchmark's manifold at N x (1 + grow) rows:

  A: the first N rows imported (`retrieval import-descriptors`) and their graph built (`retrieval graph`);
     then all rows imported into A (ids appended) and `retrieval graph` again: an update;
  B: all rows imported into a fresh run and built from scratch.

Each `retrieval graph` is its own process, timed (wall) with its own peak RSS (`pipelines.peak_memory`). Writes
OUT/growth-N-INDEX.json and prints a markdown table:

    python -m pipelines.benchmarks.growth --n 100000 --index flat
    python -m pipelines.benchmarks.growth --n 1000000 --index hnsw
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("growth")


def _cli(*args: str) -> dict:
    """One `retrieval` command in its own process: wall seconds and its own peak RSS (GiB)."""
    from pipelines.peak_memory import run_measured

    res = run_measured([sys.executable, "-m", "pipelines.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res["returncode"] != 0:
        raise RuntimeError(f"retrieval {' '.join(args)} failed:\n{res['stderr'].decode()[-3000:]}")
    return {"wall_s": round(res["seconds"], 2), "peak_gib": round(res["peak_rss_gib"], 3)}


def _graph(run: Path, index: str, k: int) -> dict:
    cfg = run.with_suffix(".toml")
    cfg.write_text(f'out = "{run}"\n\n[graph]\nk = {k}\nindex = "{index}"\n')
    res = _cli("graph", str(cfg))
    man = json.loads((run / "graph" / "manifest.json").read_text())
    keep = ("n", "nnz", "seconds", "seconds_index", "seconds_search", "recall_at_k", "updated_from_rows", "updated_rows")
    return {**res, **{key: man[key] for key in keep if key in man}}


def run(out: Path, n: int, index: str, grow: float, k: int) -> dict:
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    m = n + int(round(n * grow))
    out.mkdir(parents=True, exist_ok=True)
    x_all, x_old = out / f"X-{m}.npy", out / f"X-{m}-first-{n}.npy"
    if not x_all.is_file():
        X = make_manifold_dataset(ManifoldSpec(n=m, n_queries=10, shared_dim=32, seed=0))[0].astype(np.float32)
        np.save(x_old, X[:n])
        np.save(x_all, X)
        del X
    a, b = out / f"{index}-{n}-A", out / f"{index}-{m}-B"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
    res = {"n": n, "grown": m, "index": index, "k": k}
    _cli("import-descriptors", str(x_old), "--out", str(a))
    res["full_n"] = _graph(a, index, k)
    log.info("A full %d: %s", n, res["full_n"])
    _cli("import-descriptors", str(x_all), "--out", str(a))
    res["update"] = _graph(a, index, k)
    log.info("A update to %d: %s", m, res["update"])
    _cli("import-descriptors", str(x_all), "--out", str(b))
    res["full_grown"] = _graph(b, index, k)
    log.info("B full %d: %s", m, res["full_grown"])
    res["update_over_full"] = round(res["update"]["wall_s"] / res["full_grown"]["wall_s"], 3)
    res["update_over_full_in_stage"] = round(res["update"]["seconds"] / res["full_grown"]["seconds"], 3)
    shutil.rmtree(b, ignore_errors=True)  # A stays: the next growth step could start from it
    (out / f"growth-{n}-{index}.json").write_text(json.dumps(res, indent=1))
    return res


def markdown(r: dict) -> str:
    rows = ["| step | wall s | peak GiB | stage s | recall@k |", "|---|---|---|---|---|"]
    for label, key in ((f"A: {r['n']:,} rows, full build", "full_n"), (f"A: grown to {r['grown']:,}, **update**", "update"),
                       (f"B: {r['grown']:,} rows, full build", "full_grown")):
        s = r[key]
        rows.append(f"| {label} | {s['wall_s']} | {s['peak_gib']} | {s['seconds']:.1f} | {s.get('recall_at_k', 'exact')} |")
    rows.append(f"\nupdate / full build ({r['index']}): {100 * r['update_over_full']:.1f}% wall, "
                f"{100 * r['update_over_full_in_stage']:.1f}% in the stage")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--grow", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs/growth"))
    a = ap.parse_args(argv)
    setup_logging()
    print(markdown(run(a.out, a.n, a.index, a.grow, a.k)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
