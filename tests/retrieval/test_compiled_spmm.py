"""The compiled sparse block product against scipy's, and block CG through it."""
import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.compiled_spmm import CompiledSparse
from retrieval.diffusion import block_cg, diffusion_operator
from retrieval.graph import build_graph
from retrieval.whitening import l2_normalize


@pytest.fixture(scope="module")
def operator():
    rng = np.random.default_rng(5)
    W, _ = build_graph(l2_normalize(rng.normal(size=(900, 10))), k=9)
    return diffusion_operator(W, 0.99)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("b", [13, 1, 2, 3, 4])  # the row kernel, the one-column one, the narrow one (2 to NARROW_B)
def test_compiled_product_equals_scipy(operator, dtype, rtol, threads, b):
    P = np.random.default_rng(0).random((900, b)).astype(dtype)
    C = CompiledSparse(operator, dtype=dtype, threads=threads)
    want = sp.csr_matrix(operator, dtype=dtype) @ P
    np.testing.assert_allclose(C.unpermute(C @ C.permute(P)), want, rtol=rtol, atol=rtol * np.abs(want).max())
    v = C.unpermute(C @ C.permute(P[:, -1]))  # a single vector keeps its shape
    assert v.shape == (900,)
    np.testing.assert_allclose(v, want[:, -1], rtol=rtol, atol=rtol * np.abs(want).max())


def test_block_cg_through_compiled_product(operator):
    B = np.random.default_rng(1).random((900, 4))
    X, _ = block_cg(operator, B, rtol=1e-10, maxiter=1000)
    C = CompiledSparse(operator)
    Xc, st = block_cg(C, C.permute(B), rtol=1e-10, maxiter=1000)
    assert st.converged.all()
    np.testing.assert_allclose(C.unpermute(Xc), X, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 1e-4)])
@pytest.mark.parametrize("m", [6, 4, 3, 2])
def test_fused_block_cg_equals_block_cg(operator, dtype, rtol, m):
    """Same iterates as the numpy recurrences (with the row kernel and the narrow one): equal iteration counts, solutions to the tolerance; a zero right-hand side stays
    zero and converged."""
    B = np.random.default_rng(2).random((900, m))
    B[:, m // 2] = 0.0
    C = CompiledSparse(operator, dtype=dtype, threads=3)
    Bp = C.permute(B)
    X, st = block_cg(C, Bp, rtol=rtol, maxiter=1000, dtype=dtype)
    Xf, stf = C.cg(Bp, rtol=rtol, maxiter=1000)
    np.testing.assert_array_equal(stf.iterations, st.iterations)
    assert stf.converged.all() and (Xf[:, m // 2] == 0).all()
    np.testing.assert_allclose(Xf, X, rtol=100 * rtol, atol=100 * rtol * np.abs(X).max())


def test_fused_block_cg_reports_the_true_residual(operator):
    B = np.random.default_rng(3).random((900, 5))
    C = CompiledSparse(operator, dtype=np.float64)
    X, st = C.cg(C.permute(B), rtol=1e-3, maxiter=1000)
    want = np.linalg.norm(B - operator @ C.unpermute(X), axis=0) / np.linalg.norm(B, axis=0)
    np.testing.assert_allclose(st.residuals, want, rtol=1e-6)
    assert (st.residuals <= 1e-3 * 1.01).all()


@pytest.mark.parametrize("order", ["rcm", "partition"])
def test_product_and_solve_in_any_row_order(operator, order):
    """The product and the fused solve give the same answer in node order whatever row order the
    operator works in; a row order that is not a permutation is refused."""
    from retrieval.partition_order import partition_order, rcm_order

    perm = rcm_order(operator) if order == "rcm" else partition_order(operator, rows_per_part=100)
    P = np.random.default_rng(4).random((900, 7))
    C = CompiledSparse(operator, perm=perm)
    np.testing.assert_array_equal(C.perm, perm)
    np.testing.assert_allclose(C.unpermute(C @ C.permute(P)), operator @ P, rtol=1e-12, atol=1e-12)
    X, _ = block_cg(operator, P, rtol=1e-10, maxiter=1000)
    Xc, st = C.cg(C.permute(P), rtol=1e-10, maxiter=1000)
    assert st.converged.all()
    np.testing.assert_allclose(C.unpermute(Xc), X, rtol=1e-7, atol=1e-9)
    for bad in (perm[:-1], np.r_[perm[:-1], perm[0]], np.r_[perm[:-1], 900]):
        with pytest.raises(ValueError, match="not a permutation"):
            CompiledSparse(operator, perm=bad)
