"""The query service's core without Ray, and the batch query job: same answers as the query stage,
malformed requests refused with 4xx, chunks resumable."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.descriptors import load_descriptors
from pipelines.service import QueryIndex, RequestError, ServiceLimits


@pytest.fixture(scope="module")
def index(tiny_run):
    return QueryIndex(tiny_run[0].out, limits=ServiceLimits(max_queries=8, max_topk=20, max_image_bytes=200_000))


@pytest.mark.parametrize("method", ["knn", "diffusion"])
def test_service_ranks_equal_the_query_stage(tiny_run, index, method):
    out = Path(tiny_run[0].out)
    _, qkeys, Q = load_descriptors(out / "queries" / "descriptors", dense=False)
    ranks = pq.read_table(out / "ranks" / f"{method}.parquet").to_pydict()
    ans = index.answer({"queries": [{"vector": q.tolist()} for q in Q[:4]], "method": method, "topk": 5})
    assert [r["ids"] for r in ans["results"]] == [r[:5] for r in ranks["ids"][:4]]
    if method == "diffusion":
        assert all(r["converged"] and r["iterations"] > 0 for r in ans["results"])


def test_key_and_image_queries(tiny_run, index):
    out = Path(tiny_run[0].out)
    key = index.keys[3]
    by_key = index.answer({"queries": [{"key": key}], "method": "none", "topk": 3})["results"][0]
    assert by_key["keys"][0] == key and by_key["scores"][0] == pytest.approx(1.0, abs=1e-5)
    t = pq.read_table(sorted((out / "images").glob("part-*.parquet"))[0]).to_pydict()
    row = t["key"].index(key)
    img = base64.b64encode(t["image"][row]).decode()
    by_image = index.answer({"queries": [{"image": img}], "method": "none", "topk": 3})["results"][0]
    assert by_image["keys"][0] == key and by_image["scores"][0] == pytest.approx(1.0, abs=1e-4)  # same extractor + whitening


BAD = [
    ([], 400, "JSON object"),
    ({"queries": []}, 400, "non-empty"),
    ({"queries": [{"key": "x"}], "extra": 1}, 400, "unknown field"),
    ({"queries": [{"key": "nope"}]}, 404, "unknown key"),
    ({"queries": [{"key": 5}]}, 400, "unknown key"),
    ({"queries": [{"vector": [1.0, 2.0]}]}, 422, "list of 16 numbers"),
    ({"queries": [{"vector": [0.0] * 16}]}, 422, "non-zero"),
    ({"queries": [{"vector": ["a"] * 16}]}, 400, "numbers only"),
    ({"queries": [{"image": "!!notbase64"}]}, 400, "base64"),
    ({"queries": [{"image": base64.b64encode(b"not an image").decode()}]}, 422, "not an image"),
    ({"queries": [{"image": "A" * 300_000}]}, 413, "exceeds"),
    ({"queries": [{"key": "a", "vector": [1]}]}, 400, "exactly one"),
    ({"queries": [{"key": "a"}] * 9}, 413, "limit of 8"),
    ({"queries": [{"vector": [1.0] * 16}], "topk": 0}, 400, "positive"),
    ({"queries": [{"vector": [1.0] * 16}], "topk": 21}, 413, "limit 20"),
    ({"queries": [{"vector": [1.0] * 16}], "method": "magic"}, 400, "unknown method"),
    # values JSON allows that once crashed the parser (500): unhashable method, integers beyond
    # float64, a norm that overflows (normalised to a zero vector), a megabyte key echoed back
    ({"queries": [{"vector": [1.0] * 16}], "method": ["knn"]}, 400, "unknown method"),
    ({"queries": [{"vector": [1.0] * 16}], "method": {"knn": 1}}, 400, "unknown method"),
    ({"queries": [{"vector": [10**400] + [1.0] * 15}]}, 422, "float64 range"),
    ({"queries": [{"vector": [1e308] * 16}]}, 422, "norm overflows"),
    ({"queries": [{"vector": [float("inf")] + [1.0] * 15}]}, 422, "finite"),
    ({"queries": [{"key": "k" * 1_000_000}]}, 404, r"unknown key 'k+\.\.\.k+' \("),
]


@pytest.mark.parametrize("payload,status,msg", BAD)
def test_malformed_requests_are_refused(index, payload, status, msg):
    with pytest.raises(RequestError, match=msg) as e:
        index.answer(payload)
    assert e.value.status == status


def test_graph_methods_need_a_graph(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run[0].out, tmp_path / "run", ignore=shutil.ignore_patterns("graph"))
    idx = QueryIndex(tmp_path / "run")
    with pytest.raises(RequestError, match="needs the graph") as e:
        idx.answer({"queries": [{"key": idx.keys[0]}], "method": "diffusion"})
    assert e.value.status == 422


def test_the_runs_own_methods_are_built_when_the_index_loads(tiny_run, tmp_path):
    """A run whose [query].methods name "precomputed" gets its rows computed (and kept in graph/)
    when the index loads, not by the first request; requests then rank by it like the query stage's
    ranker over the same rows."""
    import shutil

    from pipelines.config import QueryConfig

    shutil.copytree(tiny_run[0].out, tmp_path / "run")
    cfg = QueryConfig(methods=["knn", "precomputed"], kq=5, truncate_m=40, precompute_keep=30)
    idx = QueryIndex(tmp_path / "run", query=cfg)
    assert "precomputed" in idx.rankers._built and list((tmp_path / "run" / "graph").glob("precomputed-*.json"))
    ans = idx.answer({"queries": [{"key": k} for k in idx.keys[:3]], "method": "precomputed", "topk": 5})
    ref = idx.rankers.get("precomputed").rank(idx.X[:3], 5)
    assert [r["ids"] for r in ans["results"]] == idx.ids[ref.ids].tolist()


def test_batched_requests_equal_single_requests(index):
    reqs = [index.parse({"queries": [{"key": k}], "method": m, "topk": 4}) for k in index.keys[:3] for m in ("diffusion", "aqe")]
    together = index.rank_many(reqs)
    alone = [index.rank_many([r])[0] for r in reqs]
    # the same rankings; scores to float32 rounding (the seeds' similarities come from one matrix
    # product for the whole batch, and BLAS rounds a batch of queries and a lone one differently)
    for t, a in zip(together, alone):
        for rt, ra in zip(t["results"], a["results"]):
            assert {k: v for k, v in rt.items() if k != "scores"} == {k: v for k, v in ra.items() if k != "scores"}
            np.testing.assert_allclose(rt["scores"], ra["scores"], rtol=1e-5)


def test_answer_lists_are_the_rankings_rows(index):
    """Each result of a multi-query answer carries its own query's row of the ranking: ids, keys of
    those ids, scores (rounded to 6 places), and its solve's iterations and convergence."""
    keys = list(index.keys[:5])
    parsed = index.parse({"queries": [{"key": k} for k in keys], "method": "diffusion", "topk": 6})
    res = index.rank(parsed.Q, "diffusion", 6)
    ans = index.rank_many([parsed])[0]
    key_of_id = dict(zip(index.ids.tolist(), index.keys))
    assert [r["query"] for r in ans["results"]] == keys
    for q, r in enumerate(ans["results"]):
        assert r["ids"] == index.ids[res.ids[q]].tolist()
        assert r["keys"] == [key_of_id[i] for i in r["ids"]]
        np.testing.assert_allclose(r["scores"], res.scores[q], atol=1e-6)
        assert (r["iterations"], r["converged"]) == (int(res.stats.iterations[q]), bool(res.stats.converged[q]))
        assert type(r["ids"][0]) is int and type(r["scores"][0]) is float and type(r["iterations"]) is int


def _queries_file(path: Path, index: QueryIndex, n: int = 23) -> Path:
    rng = np.random.default_rng(0)
    V = index.X[rng.integers(0, len(index.keys), n)] + 0.01 * rng.standard_normal((n, index.dim)).astype(np.float32)
    vecs = [v.tolist() for v in V]
    vecs[5] = [0.0] * index.dim  # zero vector: rejected
    vecs[17] = [1.0] * (index.dim - 1)  # wrong dimension: rejected
    pq.write_table(pa.table({"key": [f"q{i}" for i in range(n)], "vector": vecs}), path)
    return path


def test_batch_query_job_rejects_and_resumes(index, tmp_path, monkeypatch):
    from pipelines.batch_query import run_batch_query

    qfile = _queries_file(tmp_path / "queries.parquet", index)
    ref = run_batch_query(index, qfile, tmp_path / "ref", methods=["diffusion"], topk=5, chunk=5)
    assert ref["diffusion"]["ranked"] == 21 and ref["diffusion"]["rejected"] == 2
    rej = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "ref" / "diffusion" / "rejects").glob("*.parquet")))
    assert rej.column("row").to_pylist() == [5, 17]
    # the job goes through the service's code path: same answers as a request
    got = pq.read_table(tmp_path / "ref" / "diffusion" / "part-00000.parquet").to_pydict()
    V = pq.read_table(qfile).column("vector").to_pylist()[:5]
    ans = index.answer({"queries": [{"vector": v} for v in V if any(v)], "method": "diffusion", "topk": 5})
    assert got["ids"] == [r["ids"] for r in ans["results"]]

    calls = {"n": 0}
    real = index.rank

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(index, "rank", crash_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        run_batch_query(index, qfile, tmp_path / "run", methods=["diffusion"], topk=5, chunk=5)
    monkeypatch.setattr(index, "rank", real)
    again = run_batch_query(index, qfile, tmp_path / "run", methods=["diffusion"], topk=5, chunk=5)
    assert again["diffusion"]["chunks_skipped"] == 2 and again["diffusion"]["ranked"] == 21 - 10 + 1  # chunk 1 held a reject
    for p in sorted((tmp_path / "ref" / "diffusion").glob("part-*.parquet")):
        a, b = pq.read_table(p).to_pydict(), pq.read_table(tmp_path / "run" / "diffusion" / p.name).to_pydict()
        assert a["row"] == b["row"] and a["ids"] == b["ids"]


def test_batch_query_by_database_key_and_cli(tiny_run, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.config_toml import config_to_toml

    cfg = tiny_run[0]
    idx = QueryIndex(cfg.out)
    qfile = tmp_path / "keys.parquet"
    pq.write_table(pa.table({"key": idx.keys[:6] + ["missing-key"]}), qfile)
    conf = tmp_path / "run.toml"
    conf.write_text(config_to_toml(cfg))
    assert main(["query", str(conf), "--queries", str(qfile), "--methods", "knn,diffusion", "--topk", "3", "--chunk", "4",
                 "--batch-out", str(tmp_path / "b")]) == 0
    assert "knn: 6 ranked, 1 rejected" in capsys.readouterr().out
    t = pq.read_table(tmp_path / "b" / "knn" / "part-00000.parquet").to_pydict()
    assert [ids[0] for ids in t["ids"]] == idx.ids[:4].tolist()  # a database image is its own nearest neighbour
    stats = json.loads((tmp_path / "b" / "diffusion" / "stats.json").read_text())
    assert stats["ranked"] == 6 and stats["queries_per_s"] > 0


def test_index_files_with_pickled_objects_are_refused(tiny_run, tmp_path):
    """Index files load with safe loaders: a graph block holding a pickled object is refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0].out, run, ignore=shutil.ignore_patterns("images", "benchmark", "features"))
    block = sorted((run / "graph").glob("*.npz"))[0]
    with np.load(block) as z:
        arrays = dict(z)
    arrays["data"] = np.array([{"evil": "object"}], dtype=object)
    np.savez(block, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        QueryIndex(run)


def test_the_runs_query_images_are_queryable_by_key(tiny_run):
    """Issue 12 item 8: a key of the run's query set (not in the database) ranks its descriptor."""
    from pathlib import Path

    from pipelines.descriptors import load_descriptors
    from pipelines.service import QueryIndex

    run = Path(tiny_run[0].out)
    _, qkeys, Q = load_descriptors(run / "queries" / "descriptors")
    idx = QueryIndex(run, warm=("knn",))
    assert qkeys[0] not in idx.row_of_key
    by_key = idx.answer({"queries": [{"key": qkeys[0]}], "method": "knn", "topk": 5})["results"][0]
    by_vec = idx.answer({"queries": [{"vector": Q[0].tolist()}], "method": "knn", "topk": 5})["results"][0]
    assert by_key["keys"] == by_vec["keys"] and by_key["query"] == qkeys[0]
