"""The online benchmark runs the CLI stages end to end on a small N, and its figures are consistent."""
import json

import pytest

from pipelines.benchmarks.online import VARIANTS, main


@pytest.mark.timeout(300)
def test_online_benchmark_small(tmp_path):
    labels = list(VARIANTS)
    assert main(["--n", "3000", "--queries", "30", "--exact-queries", "10", "--out", str(tmp_path), "--variants", "0", "1", "3", "4"]) == 0
    r = json.loads((tmp_path / "3000" / "online.json").read_text())
    m = r["methods"]
    assert set(r["stages"]) == {"import (all)", "import (exact)", "graph"} and all(s["peak_rss_gib"] > 0 for s in r["stages"].values())
    assert m[labels[1]]["queries"] == 10 and m[labels[0]]["queries"] == 30  # the exact solve on the first 10 only
    # the compiled kernel and the scipy reference rank the same subgraphs with the same scores
    assert m[labels[4]]["map"] == pytest.approx(m[labels[3]]["map"], abs=1e-9)
    assert m[labels[4]]["map_first"] == pytest.approx(m[labels[3]]["map_first"], abs=1e-9)
    assert all(v["ms_per_query"] > 0 for v in m.values())
    assert r["graph"] == {"k": 50, "index": "flat"}


def test_online_benchmark_graph_settings(tmp_path, capsys):
    """Extra [graph] settings reach the graph stage's config; an OUT holding another graph is refused."""
    assert main(["--n", "2000", "--queries", "10", "--index", "hnsw", "--out", str(tmp_path), "--variants", "0",
                 "--graph", "hnsw_m=8", "ef_construction=16", "hnsw_storage=float"]) == 0
    r = json.loads((tmp_path / "2000" / "online.json").read_text())
    assert r["graph"] == {"k": 50, "index": "hnsw", "hnsw_m": 8, "ef_construction": 16, "hnsw_storage": "float"}
    assert "hnsw_m = 8" in (tmp_path / "2000" / "graph.toml").read_text()
    assert "hnsw_m 8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a graph built with"):
        main(["--n", "2000", "--queries", "10", "--index", "hnsw", "--out", str(tmp_path), "--variants", "0", "--graph", "hnsw_m=16"])
    with pytest.raises(SystemExit):
        main(["--graph", "hnsw_m"])  # not KEY=VALUE: argparse's one-line error
