"""Rows read from disk a block at a time (issue 15): the same numbers as rows held in memory."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.row_file import RowFile
from retrieval.knn import knn_search, refine_exact
from retrieval.row_blocks import candidate_scores, exact_topk, refine


@pytest.fixture()
def rows(tmp_path):
    X = np.random.default_rng(5).normal(size=(1000, 24)).astype(np.float32)
    with RowFile.create(tmp_path / "rows.npy", X) as f:
        yield X, f


def test_row_file_reads_the_rows_it_was_given(rows, tmp_path):
    X, f = rows
    assert f.shape == (1000, 24) and len(f) == 1000 and f.dtype == np.float32
    np.testing.assert_array_equal(f[:], X)
    np.testing.assert_array_equal(f[17:433], X[17:433])
    np.testing.assert_array_equal(f[990:2000], X[990:])  # clipped like an array's slice
    assert f[5:5].shape == (0, 24)
    picked = np.array([0, 3, 3, 999])
    np.testing.assert_array_equal(f[picked], X[picked])
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), X)  # an ordinary .npy file
    buf = np.full((50, 24), np.nan, np.float32)
    np.testing.assert_array_equal(f.read_into(100, 130, buf), X[100:130])
    with pytest.raises(ValueError, match="read_into"):  # more rows than the buffer holds
        f.read_into(0, 51, buf)
    with pytest.raises(IndexError, match="out of range"):
        f[np.array([1000])]
    with pytest.raises(IndexError, match="contiguous"):
        f[::2]
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="float32"):
        RowFile(tmp_path / "ints.npy")


@pytest.mark.parametrize("block_bytes", [24 * 4 * 7, 24 * 4 * 1000, 1 << 25])  # 7 rows a block, one block, the default
def test_blocked_scores_and_topk_equal_the_in_memory_reference(rows, block_bytes):
    """Candidates scored and re-ranked against rows read block by block (from disk or an array)
    equal numpy's products over the whole array; -1 candidates score -inf; the blocked exact
    search finds numpy's top k."""
    X, f = rows
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(40, 24)).astype(np.float32)
    cand = rng.integers(-1, 1000, size=(40, 30))
    ref = np.where(cand >= 0, np.einsum("id,ikd->ik", Q, X[np.maximum(cand, 0)]), -np.inf)
    for source in (f, X):
        S = candidate_scores(Q, source, cand, block_bytes=block_bytes)
        np.testing.assert_allclose(S, ref, rtol=1e-5, atol=1e-5)
        assert np.isneginf(S[cand < 0]).all()
        D, I = refine(Q, source, cand, 9, block_bytes=block_bytes)
        order = np.argsort(-ref, axis=1, kind="stable")[:, :9]
        np.testing.assert_array_equal(I, np.take_along_axis(cand, order, 1))
        np.testing.assert_allclose(D, np.take_along_axis(ref, order, 1), rtol=1e-5, atol=1e-5)
        De, Ie = exact_topk(Q, source, 12, knn_search, block_bytes=block_bytes)
        full = Q @ X.T
        np.testing.assert_array_equal(Ie, np.argsort(-full, axis=1, kind="stable")[:, :12])
        np.testing.assert_allclose(De, np.sort(full, axis=1)[:, ::-1][:, :12], rtol=1e-5, atol=1e-5)
    Df, If = refine_exact(Q, f, cand, 9)  # the index's re-scoring takes the file as it takes the array
    Da, Ia = refine_exact(Q, X, cand, 9)
    np.testing.assert_array_equal(If, Ia)
    np.testing.assert_array_equal(Df, Da)
    with pytest.raises(ValueError, match="past the database"):
        candidate_scores(Q, f[:100], cand, block_bytes=block_bytes)


def test_a_row_file_that_does_not_fit_leaves_nothing(tmp_path, monkeypatch):
    """A disk that fills up while the rows are written: the error propagates, no half file stays."""
    import errno

    def full(f, X, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(OSError, match="No space"):
        RowFile.create(tmp_path / "rows.npy", np.zeros((10, 4), np.float32))
    assert not (tmp_path / "rows.npy").exists()
