"""Command-line interface: `retrieval run CONFIG` or one stage at a time."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config

log = logging.getLogger("retrieval")
STAGE_ORDER = ["ingest", "extract", "graph", "query", "evaluate"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval", description="Batch indexing for image retrieval with diffusion ranking.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "all stages: ingest, extract, graph, query, evaluate (+ report)")] + [
        (s, f"the {s} stage only") for s in STAGE_ORDER
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="TOML run configuration (see deploy/configs/demo.toml)")
        sp.add_argument("--out", help="run directory (overrides `out` in the config)")
        sp.add_argument("--engine", choices=["ray", "local"], help="extraction engine (overrides [extract].engine)")
    imp = sub.add_parser("import-descriptors", help="precomputed descriptors (.npy/.fvecs/.mat/.parquet) -> descriptor shards")
    imp.add_argument("database", help="database descriptors file, rows are descriptors")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--keys", help="text file, one image key per line (default db00000000, ...)")
    imp.add_argument("--queries", help="query descriptors file (same format)")
    imp.add_argument("--query-keys", help="text file of query keys")
    imp.add_argument("--variable", default="", help=".mat variable holding the matrix")
    imp.add_argument("--transpose", action="store_true", help="the file stores one descriptor per column (d x n)")
    imp.add_argument("--shard-size", type=int, default=100_000)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "import-descriptors":
        from .descriptors import DescriptorError
        from .import_descriptors import import_descriptors

        try:
            import_descriptors(Path(args.out), Path(args.database), keys=args.keys, queries=args.queries, query_keys=args.query_keys,
                               variable=args.variable, transpose=args.transpose, shard_size=args.shard_size)
        except DescriptorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"descriptors: {Path(args.out) / 'descriptors'}")
        return 0
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(cfg.log_level.upper())
    if args.out:
        cfg.out = args.out
    if args.engine:
        cfg.extract.engine = args.engine
    from .evaluate import format_table
    from .descriptors import DescriptorError
    from .ingest import IngestError
    from .models import WeightsError
    from .run import run_stages

    stages = STAGE_ORDER if args.command == "run" else [args.command]
    try:
        res = run_stages(cfg, stages)
    except (ConfigError, IngestError, WeightsError, DescriptorError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "evaluate" in res:
        out = Path(cfg.out)
        print("\nmAP (%)\n" + format_table(res["evaluate"]["metrics"]))
        print(f"\nresults: {out / 'metrics.json'}\nreport:  {res['evaluate']['report']}\nranks:   {out / 'ranks'}")
        print(f"timings (s): {res['timings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
