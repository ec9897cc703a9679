"""Logging of the command-line entry points: one format, and third-party noise kept out."""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers whose INFO lines are not for users: faiss logs each CPU-specific build it tries and cannot
# load (a dynamic-dispatch wheel), with a ModuleNotFoundError per build
QUIET = ("faiss.loader",)


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging to stderr at `level` (a no-op where the root already has handlers) and the
    `QUIET` loggers at WARNING."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
