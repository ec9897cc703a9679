"""Errors of the engine layer that a user can act on (a refused token, an unknown job, a port in
use): the CLI prints them on one line, without a traceback."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """A cluster request was refused or cannot be carried out; the message says why."""
