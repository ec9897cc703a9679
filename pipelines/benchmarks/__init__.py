"""Benchmark scripts (each writes JSON results and a Markdown table; see BENCHMARKS.md)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def ingested_run(config: str):
    """Set up logging, load a run config and make sure its images are ingested: (cfg, run dir)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from pipelines.config import load_config
    from pipelines.run import resolve_dataset, run_stages

    cfg = load_config(config)
    base = Path(cfg.out)
    if not (base / "images").is_dir():
        run_stages(cfg, ["ingest"])
    resolve_dataset(cfg, base)
    return cfg, base
