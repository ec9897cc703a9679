"""Benchmark scripts (each writes JSON results and a Markdown table; see BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path


def ingested_run(config: str):
    """Set up logging, load a run config and make sure its images are ingested: (cfg, run dir)."""
    from pipelines.logs import setup_logging

    setup_logging()
    from pipelines.config import load_config
    from pipelines.run import resolve_dataset, run_stages

    cfg = load_config(config)
    base = Path(cfg.out)
    if not (base / "images").is_dir():
        run_stages(cfg, ["ingest"])
    resolve_dataset(cfg, base)
    return cfg, base
