"""Starting or joining Ray (embedded local Ray by default), in one place."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str = "", *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or at RAY_ADDRESS, which Ray Jobs sets for a submitted run),
    or else start an embedded local Ray (dashboard off, loopback only, token authentication on as
    Ray's default). A cluster started on this machine with `ray start` is never joined by accident:
    the embedded default asks for a new local instance.

    Idempotent: does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("ray: connecting to %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("ray: starting embedded local Ray")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
