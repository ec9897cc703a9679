"""Starting or joining Ray (embedded local Ray by default), in one place."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str = "", *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start an embedded local Ray (dashboard off, loopback only).

    Idempotent: does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        log.info("ray: connecting to %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("ray: starting embedded local Ray")
        ray.init(num_cpus=num_cpus, **kwargs)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
