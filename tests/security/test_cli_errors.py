"""The CLI reports the user's errors on one line (`error: ...`, exit status 2) and shows a
traceback only for bugs or with --debug: invalid sizes in the configuration, a refused ground-truth
pickle, a refused token or unknown job, a port in use, ranks that outlived their descriptors."""
from __future__ import annotations

import dataclasses
import http.server
import json
import pickle
import re
import socket
import threading
import typing
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def error_line(capsys) -> str:
    """The one `error: ...` line on stderr, with no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- positive integers in the configuration ---------------------------------------------------------------------

def _min_fields():
    hints = typing.get_type_hints(RunConfig)
    for sec in dataclasses.fields(RunConfig):
        cls = hints[sec.name]
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if "min" in f.metadata:
                    yield sec.name, f, typing.get_type_hints(cls)[f.name]


MIN_FIELDS = [(s, f.name, f.metadata["min"], tp) for s, f, tp in _min_fields()]


def test_sizes_counts_and_limits_carry_a_minimum():
    named = {(s, k) for s, k, _, _ in MIN_FIELDS}
    assert {("ingest", "shard_size"), ("extract", "batch_size"), ("graph", "k"), ("graph", "block_rows"), ("query", "kq"),
            ("query", "topk"), ("query", "maxiter"), ("query", "batch"), ("train", "epochs"), ("train", "embed_batch"),
            ("train", "batch_tuples"), ("evaluate", "kappas")} <= named
    assert dict(((s, k), m) for s, k, m, _ in MIN_FIELDS)[("query", "topk")] == 0  # 0 keeps the whole database
    cfg = RunConfig()
    for s, k, m, _ in MIN_FIELDS:  # every default is allowed
        v = getattr(getattr(cfg, s), k)
        assert all(x >= m for x in (v if isinstance(v, list) else [v])), (s, k, v)
    for name in ("demo.toml", "cluster.toml"):
        load_config(ROOT / "deploy" / "configs" / name)


@pytest.mark.parametrize("section,key,minimum,tp", MIN_FIELDS, ids=[f"{s}.{k}" for s, k, _, _ in MIN_FIELDS])
def test_a_value_below_the_minimum_is_refused_naming_the_key(tmp_path, section, key, minimum, tp):
    bad = minimum - 1
    value = f"[{bad}]" if typing.get_origin(tp) is list else str(bad)
    (tmp_path / "c.toml").write_text(f"[{section}]\n{key} = {value}\n")
    where = f"{section}.{key}[0]" if typing.get_origin(tp) is list else f"{section}.{key}"
    with pytest.raises(ConfigError, match=rf"config: {re.escape(where)} must be .*{minimum}.*; got {bad}$"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text(f"[{section}]\n{key} = {f'[{minimum}]' if typing.get_origin(tp) is list else minimum}\n")
    load_config(tmp_path / "c.toml")  # the minimum itself is fine


@pytest.mark.parametrize("value", [-3, 0])
def test_cli_refuses_a_bad_shard_size_in_one_line(tmp_path, capsys, value):
    (tmp_path / "c.toml").write_text(f'out = "{tmp_path / "run"}"\n[dataset]\ndatabase = "{tmp_path}"\n[ingest]\nshard_size = {value}\n')
    assert main(["ingest", str(tmp_path / "c.toml")]) == 2
    assert error_line(capsys) == f"error: config: ingest.shard_size must be a positive integer (>= 1); got {value}"
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback_wherever_the_flag_is(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[ingest]\nshard_size = 0\n")
    for argv in (["--debug", "ingest", str(tmp_path / "c.toml")], ["ingest", str(tmp_path / "c.toml"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "ConfigError" in err and "error: config: ingest.shard_size" in err


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    import pipelines.run

    def bug(cfg, run_dir):
        raise IndexError("a bug, not a user error")

    monkeypatch.setitem(pipelines.run.STAGES, "graph", bug)
    monkeypatch.setattr(pipelines.run, "missing_inputs", lambda *a: None)  # the stage runs, and fails
    (tmp_path / "c.toml").write_text(f'out = "{tmp_path / "run"}"\n')
    with pytest.raises(IndexError, match="a bug"):
        main(["graph", str(tmp_path / "c.toml")])


# --- evaluate: refused ground truth, ranks that outlived their descriptors, config.resolved.json --------------------

@pytest.fixture
def evaluated_run(tmp_path):
    """An imported run (3 descriptor shards) with knn ranks, its ground truth and a config."""
    from pipelines.import_descriptors import import_descriptors

    rng = np.random.default_rng(0)
    db_keys = [f"img{i:02d}.jpg" for i in range(30)]
    (tmp_path / "keys.txt").write_text("\n".join(db_keys))
    (tmp_path / "qkeys.txt").write_text("q0.jpg\nq1.jpg\n")
    np.save(tmp_path / "db.npy", rng.normal(size=(30, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.normal(size=(2, 8)).astype(np.float32))
    run = tmp_path / "run"
    import_descriptors(run, tmp_path / "db.npy", keys=tmp_path / "keys.txt", queries=tmp_path / "q.npy",
                       query_keys=tmp_path / "qkeys.txt", shard_size=10)
    (run / "ranks").mkdir()
    ids = [list(range(30)), list(range(29, -1, -1))]
    pq.write_table(pa.table({"query": ["q0.jpg", "q1.jpg"], "ids": pa.array(ids, pa.list_(pa.int64())),
                             "scores": pa.array([[1.0] * 30] * 2, pa.list_(pa.float32()))}), run / "ranks" / "knn.parquet")
    gnd = {"imlist": db_keys, "qimlist": ["q0.jpg", "q1.jpg"],
           "gnd": [{"easy": [0, 1], "hard": [2], "junk": []}, {"easy": [29], "hard": [], "junk": [5]}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    conf = tmp_path / "run.toml"
    conf.write_text(f'out = "{run}"\n[dataset]\ngnd = "{tmp_path / "gnd.json"}"\n[query]\nmethods = ["knn"]\n'
                    "[evaluate]\nreport_queries = 0\n")
    return run, conf, tmp_path


def test_evaluate_does_not_rewrite_config_resolved(evaluated_run, capsys):
    run, conf, _ = evaluated_run
    (run / "config.resolved.json").write_text('{"written": "by the stages that made the outputs"}')
    assert main(["evaluate", str(conf)]) == 0
    assert json.loads((run / "metrics.json").read_text())["knn"]["M"] == pytest.approx(100.0)
    assert (run / "config.resolved.json").read_text() == '{"written": "by the stages that made the outputs"}'


def test_producing_stages_still_write_config_resolved(tmp_path, monkeypatch):
    import pipelines.run

    monkeypatch.setitem(pipelines.run.STAGES, "graph", lambda cfg, run_dir: {})
    monkeypatch.setattr(pipelines.run, "missing_inputs", lambda *a: None)
    cfg = RunConfig(out=str(tmp_path / "run"))
    pipelines.run.run_stages(cfg, ["graph"])
    assert json.loads((tmp_path / "run" / "config.resolved.json").read_text())["graph"]["k"] == cfg.graph.k


@pytest.mark.parametrize("shard", ["part-00002.parquet", "part-00001.parquet"])
def test_evaluate_after_a_descriptor_shard_was_deleted(evaluated_run, capsys, shard):
    run, conf, _ = evaluated_run
    (run / "descriptors" / shard).unlink()
    assert main(["evaluate", str(conf)]) == 2
    line = error_line(capsys)
    assert "knn.parquet ranks 10 database id(s) that descriptors/ lacks" in line and "rerun `retrieval extract`" in line
    assert not (run / "metrics.json").exists()


def test_a_refused_ground_truth_pickle_is_one_line(evaluated_run, capsys):
    run, conf, d = evaluated_run
    gnd = json.loads((d / "gnd.json").read_text())
    (d / "gnd.pkl").write_bytes(pickle.dumps(OrderedDict(gnd)))  # refers to collections.OrderedDict: refused
    conf.write_text(conf.read_text().replace("gnd.json", "gnd.pkl"))
    assert main(["evaluate", str(conf)]) == 2
    line = error_line(capsys)
    assert "gnd.pkl refused" in line and "collections.OrderedDict" in line
    (d / "gnd.pkl").write_bytes(pickle.dumps(gnd)[:-20])  # truncated
    assert main(["evaluate", str(conf)]) == 2
    assert "gnd.pkl is malformed or truncated" in error_line(capsys)
    (d / "gnd.pkl").write_bytes(pickle.dumps({"imlist": []}))  # fields missing
    assert main(["evaluate", str(conf)]) == 2
    assert "missing field 'gnd'" in error_line(capsys)


# --- cluster commands: a refused token, an unknown job, an unreachable API, a port in use ---------------------------

class _JobAPI(http.server.BaseHTTPRequestHandler):
    """A stand-in Ray job API: refuses every token (mode "auth") or knows no job (mode "nojob")."""

    mode = "auth"

    def do_GET(self):  # noqa: N802
        import ray

        if self.mode == "auth":
            return self._send(403, "Unauthorized: invalid token", "text/plain")
        if self.path == "/api/version":
            return self._send(200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "test"}))
        return self._send(404, f"Job {self.path.split('/')[3]} does not exist", "text/plain")

    do_POST = do_GET

    def _send(self, status: int, body: str, ctype: str = "application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def job_api(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token")
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_JobAPI,), {"mode": mode})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_a_refused_token_is_one_line(job_api, tmp_path, capsys):
    url = job_api("auth")
    assert main(["status", "some-job", "--address", url]) == 2
    line = error_line(capsys)
    assert f"the job API at {url} refused the request" in line and "RAY_AUTH_TOKEN" in line
    (tmp_path / "c.toml").write_text(f'out = "{tmp_path / "run"}"\n')
    assert main(["submit", str(tmp_path / "c.toml"), "--address", url]) == 2
    assert "refused the request" in error_line(capsys)
    assert main(["logs", "some-job", "--address", url]) == 2
    assert "refused the request" in error_line(capsys)


def test_an_unknown_job_is_one_line(job_api, capsys):
    url = job_api("nojob")
    for cmd in (["status", "nope"], ["logs", "nope"], ["logs", "nope", "--follow"]):
        assert main(cmd + ["--address", url]) == 2
        assert error_line(capsys) == f"error: no job 'nope' on the cluster at {url}"


def test_an_unreachable_job_api_is_one_line(job_api, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["status", "x", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the job API" in error_line(capsys)


def test_serve_on_a_port_in_use_is_one_line_and_starts_no_ray(tmp_path, capsys, monkeypatch):
    import cluster.ray_runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a port that is in use")

    monkeypatch.setattr(cluster.ray_runtime, "init_ray", no_ray)
    (tmp_path / "run" / "descriptors").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tmp_path / "run"), "--port", str(port)]) == 2
    assert error_line(capsys) == f"error: serve: port {port} on 127.0.0.1 is already in use; choose another with --port"
    assert main(["serve", str(tmp_path / "nothing"), "--port", str(port)]) == 2
    assert "has no descriptors/" in error_line(capsys)


# --- the machine's limits: a full disk, a quota, a read-only or refused path --------------------------------------

@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EROFS", "EACCES"])
def test_a_full_disk_or_refused_path_is_one_line_and_other_os_errors_are_bugs(tmp_path, capsys, monkeypatch, code):
    """A stage that cannot write (the graph stage's scratch rows on a full disk, a read-only run
    folder) stops with one line naming the path; an OS error the user cannot act on stays a bug."""
    import errno
    import os

    import pipelines.import_descriptors as imp

    def full(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(tmp_path / "run" / "graph" / "rows.tmp.npy"))

    monkeypatch.setattr(imp, "import_descriptors", full)
    np.save(tmp_path / "X.npy", np.eye(4, dtype=np.float32))
    assert main(["import-descriptors", str(tmp_path / "X.npy"), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert os.strerror(getattr(errno, code)) in line and "rows.tmp.npy" in line

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(imp, "import_descriptors", broken)
    with pytest.raises(OSError, match="Input/output"):
        main(["import-descriptors", str(tmp_path / "X.npy"), "--out", str(tmp_path / "run")])
