"""Starting or joining Ray (embedded local Ray by default), in one place.

`init_ray` is the only call in the project that starts or joins Ray; the engines (Ray Data
extraction, sharded graph search, Ray Train, the Ray-placed PETSc ranks) only `require_ray`.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Ray picks a node's address itself and resolves 127.0.0.1 to the machine's outward address, and its
# gRPC servers (GCS, raylet, core workers, object manager), agents and metrics exporters bind to that
# address or to all interfaces; only a node whose address is loopback binds all of them to 127.0.0.1.
# Ray 2.60 uses loopback as the node address exactly when this flag (its single-machine mode on
# Windows/macOS) is "0". The one place that depends on it: `loopback_node()`. A node started with it
# cannot join another machine's cluster, which is what the embedded Ray and a head on one machine want.
_LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_node_env() -> dict[str, str]:
    """Environment that makes a Ray node (ray.init's own, or `ray start --head`) bind every listener to 127.0.0.1."""
    return {_LOOPBACK_NODE_ENV: "0"}


# Ray Serve's direct ingress (read from the environment when Serve's controller and replicas start):
# the ingress replica also answers HTTP itself on a port of its own, bound to the service's host, so a
# request skips the proxy's hop (half the latency of a one-query request here, BENCHMARKS.md); the
# proxy keeps answering on the service's port. On unless the environment sets it to "0". A stopping
# replica then stays open 30 s by default for an external load balancer to deregister it; the nodes
# this project starts have none in front (clients call the replica's address), so 1 s, still
# waiting for the requests in flight.
_SERVE_NODE_DEFAULTS = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_node_env() -> dict[str, str]:
    """Environment for a Ray node this project starts (embedded Ray, `cluster.local_cluster`): Serve's
    direct ingress on, a short drain; each overridable from the caller's environment."""
    return {k: os.environ.get(k, v) for k, v in _SERVE_NODE_DEFAULTS.items()}


def loopback_node() -> None:
    """Make the Ray node this process starts, and every process it spawns, listen on loopback only."""
    os.environ.update(loopback_node_env())
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:  # already imported: the flag was read at import
        consts.ENABLE_RAY_CLUSTER = False


def _is_loopback_address(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _token_auth_on() -> None:
    """Token authentication on for this process (Ray turns it on by itself only when it starts the
    cluster). Ray reads RAY_AUTH_MODE into its config once: refresh that if Ray is loaded already."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def token_path() -> Path:
    """Where Ray reads its auth token: RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def auth_token() -> str | None:
    """Ray's auth token from the environment or its token file, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path()
    return path.read_text().strip() if path.is_file() else None


def ensure_auth_token() -> str:
    """The auth token, created (256 random bits, as Ray makes them) when there is none, in a file
    readable by its owner only (0600, folder 0700): Ray itself would write it world-readable. An
    existing token file with looser permissions is tightened."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path()
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("ray: auth token %s was readable by others; now 0600", path)
            path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        log.info("ray: generated an auth token in %s (0600)", path)
    token = path.read_text().strip()
    if not token:
        raise RuntimeError(f"the Ray auth token file {path} is empty: delete it and rerun to generate one")
    return token


def init_ray(address: str = "", *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or at RAY_ADDRESS, which Ray Jobs sets for a submitted run),
    or else start an embedded local Ray (dashboard off, every listener on 127.0.0.1, token
    authentication on with a token file only its owner can read). A cluster started on this machine with `ray start` is never joined by accident:
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
        if _is_loopback_address(address):  # a cluster on this machine (cluster.local_cluster): loopback, token auth
            loopback_node()
            if auth_token() and "RAY_AUTH_MODE" not in os.environ:
                _token_auth_on()
        ray.init(address=address, **kwargs)
    else:
        log.info("ray: starting embedded local Ray")
        ensure_auth_token()
        if "RAY_AUTH_MODE" not in os.environ:  # Ray's default for a new local cluster, said explicitly (no warning)
            _token_auth_on()
        loopback_node()
        os.environ.update(serve_node_env())
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    ray.put(None)  # Ray builds its serialization context on first use (0.08-0.14 s of imports here): now, not in a stage's first task


def require_ray(what: str) -> None:
    """Raise unless Ray is up in this process. The engines call this instead of letting a Ray call
    start Ray implicitly (which would ignore `ray_address` and could join any cluster it finds on
    this machine): Ray is started only by `init_ray`, from the stages' `ray_address`."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{what} runs on Ray, and Ray is not started in this process: start it with "
                           "cluster.ray_runtime.init_ray(ray_address) (the pipeline does so for every stage that needs it)")


def ray_is_up() -> bool:
    """Whether Ray is started (or joined) in this process."""
    import ray

    return ray.is_initialized()


def cluster_address() -> str:
    """The address other processes join this process's Ray at (host:port of its GCS)."""
    import ray

    require_ray("cluster_address")
    return ray.get_runtime_context().gcs_address


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def ray_start_loopback(argv: list[str]) -> int:
    """`ray start ARGV` for a node of a cluster on this one machine, every listener on 127.0.0.1.

    A head only needs `loopback_node()`. A worker also needs two things Ray refuses on its own:
    joining in single-machine mode, and keeping 127.0.0.1 as the head's and its own address (Ray
    resolves loopback to the machine's outward address, where the head does not listen). This
    process keeps multi-node mode on and leaves loopback addresses as given; the processes the node
    spawns run in loopback mode through the environment.
    """
    loopback_node()
    from ray._common.network_utils import is_localhost
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: "127.0.0.1" if host and is_localhost(host) else resolve(host)
    sys.argv = ["ray", "start", *argv]
    try:
        ray_main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":  # python -m cluster.ray_runtime ARGS: `ray start ARGS` on loopback
    logging.basicConfig(level=logging.INFO)
    sys.exit(ray_start_loopback(sys.argv[1:]))
