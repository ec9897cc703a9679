"""Submitting pipeline runs to a Ray cluster through the Ray Jobs API, and following them.

`submit_run` packages the code (`pipelines/`, `retrieval/`, `cluster/`) and the run's configuration
(TOML text, written as `job.toml`) into the job's working directory, and submits
`python -m pipelines.cli <stage> job.toml`. The configuration arrives as text with its paths
already absolute (the caller's `pipelines.config.absolute_paths`); this module never parses it.
Inside the job, `init_ray("")` joins the cluster through the RAY_ADDRESS that Ray Jobs sets. The run
directory must be on storage every node sees (a shared filesystem on a real cluster; the local disk
when all nodes run on one machine).

Authentication: Ray's token authentication stays on. The token is read from RAY_AUTH_TOKEN, the file
named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's default), and sent as a bearer token.

A refused token, an unknown job id or an unreachable job API raise `ClusterError` with one line
saying which (Ray's own errors carry the HTTP body and several lines of advice).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cluster.errors import ClusterError
from cluster.job_env import JOB_DIR_ENV
from cluster.ray_runtime import auth_token

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "retrieval", "cluster")


@contextlib.contextmanager
def _job_api(address: str, job_id: str | None = None):
    """Ray's job API errors -> ClusterError with a one-line reason; anything else propagates."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "authentication failed"
        raise ClusterError(f"the job API at {address or 'RAY_ADDRESS'} refused the request ({first[:200]}): set RAY_AUTH_TOKEN "
                           "or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
    except (ConnectionError, requests.exceptions.RequestException) as e:  # unreachable, refused, reset, timed out
        raise ClusterError(f"cannot reach the job API at {address or 'RAY_ADDRESS'}: {str(e).splitlines()[0][:200] if str(e) else e!r}") from None
    except RuntimeError as e:
        msg = str(e)
        if not msg.startswith("Request failed with status code") and not msg.startswith("Version check returned"):
            raise
        if job_id is not None and msg.startswith("Request failed with status code 404"):
            raise ClusterError(f"no job {job_id!r} on the cluster at {address or 'RAY_ADDRESS'}") from None
        raise ClusterError(f"the job API at {address or 'RAY_ADDRESS'} failed: {' '.join(msg.split())[:300]}") from None


def job_client(address: str):
    """JobSubmissionClient for the dashboard at `address` (http://host:8265), sending the token."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ValueError("submit: give the cluster's job API address (--address http://HEAD:8265) or set RAY_ADDRESS")
    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    if tok is None:
        log.warning("no Ray auth token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): a cluster with token "
                    "authentication will refuse the request")
    with _job_api(address):
        return JobSubmissionClient(address, headers=headers)


def stage_job(config_toml: str, dest: Path) -> Path:
    """Write the job's working directory: the code packages and job.toml. Returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    (dest / "job.toml").write_text(config_toml)
    return dest




def submit_run(config_toml: str, *, out: str, address: str, command: str = "run", env: dict | None = None,
               submission_id: str | None = None, entrypoint_num_cpus: float = 0.0, agent_wait_s: float = 60.0) -> str:
    """Submit `retrieval <command> job.toml` as a Ray job, job.toml holding `config_toml` (a run
    configuration with absolute paths); `out` (its run directory) is recorded in the job's
    metadata. Returns the submission id."""
    client = job_client(address)
    sid = submission_id or f"retrieval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="retrieval-job-") as tmp, _job_api(address):
        stage_job(config_toml, Path(tmp))
        runtime_env = {"working_dir": tmp, "env_vars": {"PYTHONUNBUFFERED": "1", JOB_DIR_ENV: str(out), **(env or {})}}
        t0 = time.monotonic()
        while True:
            try:
                client.submit_job(entrypoint=f"python -m pipelines.cli {command} job.toml", submission_id=sid, runtime_env=runtime_env,
                                  metadata={"out": out, "command": command}, entrypoint_num_cpus=entrypoint_num_cpus)
                break
            except RuntimeError as e:  # a freshly started head answers 500 until its job agent is up
                if "No available agent" not in str(e) or time.monotonic() - t0 > agent_wait_s:
                    raise
                time.sleep(2)
    log.info("submitted %s (retrieval %s, out %s)", sid, command, out)
    return sid


def job_status(address: str, job_id: str) -> dict:
    client = job_client(address)
    with _job_api(address, job_id):
        info = client.get_job_info(job_id)
    return {"job": job_id, "status": str(info.status), "message": info.message, "out": (info.metadata or {}).get("out"),
            "start_time": info.start_time, "end_time": info.end_time}


def wait_job(address: str, job_id: str, *, timeout: float = 3600, poll: float = 1.0) -> str:
    """Block until the job ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    client = job_client(address)
    t0 = time.monotonic()
    while True:
        with _job_api(address, job_id):
            st = client.get_job_status(job_id)
        if st.is_terminal():
            return str(st)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"job {job_id} still {st} after {timeout} s")
        time.sleep(poll)


def job_logs(address: str, job_id: str, *, follow: bool = False, stream=None) -> None:
    """Write the job's logs to `stream` (stdout by default); with follow, until the job ends."""
    stream = stream or sys.stdout
    client = job_client(address)
    if not follow:
        with _job_api(address, job_id):
            logs = client.get_job_logs(job_id)
        stream.write(logs)
        return
    with _job_api(address, job_id):
        client.get_job_info(job_id)  # an unknown job is named here, not met inside the log stream

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            stream.write(lines)
            stream.flush()

    asyncio.run(_tail())
