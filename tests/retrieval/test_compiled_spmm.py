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
def test_compiled_product_equals_scipy(operator, dtype, rtol, threads):
    P = np.random.default_rng(0).random((900, 13)).astype(dtype)
    C = CompiledSparse(operator, dtype=dtype, threads=threads)
    want = sp.csr_matrix(operator, dtype=dtype) @ P
    np.testing.assert_allclose(C.unpermute(C @ C.permute(P)), want, rtol=rtol, atol=rtol * np.abs(want).max())
    v = C.unpermute(C @ C.permute(P[:, 2]))  # a single vector keeps its shape
    assert v.shape == (900,)
    np.testing.assert_allclose(v, want[:, 2], rtol=rtol, atol=rtol * np.abs(want).max())


def test_block_cg_through_compiled_product(operator):
    B = np.random.default_rng(1).random((900, 4))
    X, _ = block_cg(operator, B, rtol=1e-10, maxiter=1000)
    C = CompiledSparse(operator)
    Xc, st = block_cg(C, C.permute(B), rtol=1e-10, maxiter=1000)
    assert st.converged.all()
    np.testing.assert_allclose(C.unpermute(Xc), X, rtol=1e-7, atol=1e-9)
