"""Descriptor columns to numpy without pyarrow's pandas-backed conversion: the same values (sliced,
chunked, with nulls through the fallback), and a graph stage's load that never imports pandas."""
import subprocess
import sys

import numpy as np
import pyarrow as pa

from pipelines.descriptors import plain_values


def test_plain_values_equal_pyarrows_conversion():
    a = pa.array(np.arange(20, dtype=np.float32))
    np.testing.assert_array_equal(plain_values(a.slice(5, 7)), np.arange(5, 12, dtype=np.float32))
    ids = pa.chunked_array([pa.array(np.arange(3, dtype=np.int64)), pa.array(np.arange(10, 14, dtype=np.int64)).slice(1)])
    out = plain_values(ids)
    assert out.dtype == np.int64 and out.tolist() == [0, 1, 2, 11, 12, 13]
    assert plain_values(pa.chunked_array([], pa.int64())).shape == (0,)
    with_null = plain_values(pa.array([1.0, None, 3.0], pa.float32()))
    assert np.isnan(with_null[1]) and with_null[[0, 2]].tolist() == [1.0, 3.0]
    v = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3).slice(1, 2)
    np.testing.assert_array_equal(plain_values(v.flatten()).reshape(2, 3), np.arange(3, 9, dtype=np.float32).reshape(2, 3))


def test_loading_descriptors_does_not_import_pandas(tmp_path):
    from pipelines.import_descriptors import import_descriptors

    X = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # imported as they are
    np.save(tmp_path / "x.npy", X)
    import_descriptors(tmp_path / "run", tmp_path / "x.npy", shard_size=128)
    code = ("import sys; import numpy as np; from pipelines.descriptors import load_descriptors; "
            f"ids, _, X = load_descriptors({str(tmp_path / 'run' / 'descriptors')!r}, keys=False); "
            f"assert np.allclose(X, np.load({str(tmp_path / 'x.npy')!r})) and ids.tolist() == list(range(300)); "
            "assert 'pandas' not in sys.modules, 'pandas imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_float_columns_are_written_without_dictionary_encoding(tmp_path):
    """Descriptor vectors and regional vectors are written plain (a dictionary of 10^5 distinct floats
    costs 7-9x the write's CPU and makes the file larger); the other columns keep Parquet's dictionary;
    the values read back are the same bits."""
    import pyarrow.parquet as pq

    from pipelines.descriptors import load_descriptors, write_descriptors
    from pipelines.shards import shard_done

    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 96)).astype(np.float32)
    regs = [rng.normal(size=(k, 96)).astype(np.float32) for k in rng.integers(0, 4, 64)]
    boxes = [rng.uniform(0, 99, size=(len(r), 4)).astype(np.float32) for r in regs]
    path = tmp_path / "d" / "part-00000.parquet"
    write_descriptors(path, np.arange(64), [f"k{i % 5}" for i in range(64)], X, params="p", regions={"regions": regs, "region_boxes": boxes})
    meta = pq.ParquetFile(path).metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema: meta.column(i).has_dictionary_page for i in range(meta.num_columns)}
    assert dictionary["key"] and dictionary["id"]
    floats = [c for c in dictionary if c not in ("id", "key")]
    assert len(floats) >= 3 and not any(dictionary[c] for c in floats), dictionary
    assert shard_done(path, params="p")
    ids, keys, back = load_descriptors(path.parent)
    assert ids.tolist() == list(range(64)) and keys[:6] == ["k0", "k1", "k2", "k3", "k4", "k0"]
    assert back.tobytes() == X.tobytes()
