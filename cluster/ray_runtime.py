"""Starting or joining Ray (embedded local Ray by default), in one place.

`init_ray` is the only call in the project that starts or joins Ray; the engines (Ray Data
extraction, sharded graph search, Ray Train, the Ray-placed PETSc ranks) only `require_ray`.
"""
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


def require_ray(what: str) -> None:
    """Raise unless Ray is up in this process. The engines call this instead of letting a Ray call
    start Ray implicitly (which would ignore `ray_address` and could join any cluster it finds on
    this machine): Ray is started only by `init_ray`, from the stages' `ray_address`."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{what} runs on Ray, and Ray is not started in this process: start it with "
                           "cluster.ray_runtime.init_ray(ray_address) (the pipeline does so for every stage that needs it)")


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
