"""Launching the distributed PETSc solve from a Ray cluster: one MPI rank per placement-group bundle.

A placement group reserves `ranks` bundles of `cpus_per_rank` CPUs (SPREAD: on different nodes
where the cluster has them). A probe in each bundle reports its node's address; a launcher task in
bundle 0 runs `mpiexec --host ip:slots,...` so that each node gets as many ranks as it holds
bundles, while the bundles keep those CPUs reserved for the ranks. Across machines OpenMPI starts
remote ranks over ssh (the container in deploy/ has it), and the graph and the work folder must be
on storage every node sees.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def mpi_hosts(ips: list[str]) -> str:
    """Bundle node addresses -> OpenMPI --host "ip:slots,..." in first-seen order."""
    counts = Counter(ips)
    return ",".join(f"{ip}:{counts[ip]}" for ip in dict.fromkeys(ips))


def solve_on_ray(graph_dir: Path, D: np.ndarray, I: np.ndarray, *, reader: str, ranks: int, k: int, alpha: float = 0.99, gamma: float = 3.0,
                 rtol: float = 1e-6, maxiter: int = 100, cpus_per_rank: float = 1.0, strategy: str = "SPREAD",
                 work_dir: Path | None = None, timeout: float = 600) -> tuple[np.ndarray, np.ndarray, dict]:
    """`cluster.petsc_solver.solve_with_mpiexec` with its ranks placed on the Ray cluster's nodes."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .petsc_solver import solve_with_mpiexec
    from .ray_runtime import require_ray

    require_ray("the Ray-placed PETSc solve (petsc_launch = ray)")

    @ray.remote(num_cpus=0)
    def _node_ip() -> str:
        return ray.util.get_node_ip_address()

    @ray.remote(num_cpus=0, max_retries=0)
    def _launch(hosts: str, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        return solve_with_mpiexec(Path(graph_dir), D, I, reader=reader, ranks=ranks, k=k, alpha=alpha, gamma=gamma, rtol=rtol, maxiter=maxiter,
                                  timeout=timeout, hosts=hosts, work_dir=work_dir)

    pg = placement_group([{"CPU": cpus_per_rank}] * ranks, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout)
        ips = ray.get([_node_ip.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(ranks)])
        hosts = mpi_hosts(ips)
        log.info("petsc: %d MPI ranks on %s (placement group %s)", ranks, hosts, pg.id.hex()[:8])
        strat = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        return ray.get(_launch.options(scheduling_strategy=strat).remote(hosts, D, I), timeout=timeout)
    finally:
        remove_placement_group(pg)
