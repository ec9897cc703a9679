"""Query expansion baselines: average QE and alpha-QE (Radenovic et al., TPAMI 2018)."""
from __future__ import annotations

import numpy as np


def alpha_qe(
    queries: np.ndarray, database: np.ndarray, I: np.ndarray, D: np.ndarray, *, n: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """Expanded queries: q' = normalise(q + sum_{i<n} max(s_i, 0)^alpha x_i).

    Args:
        queries: (nq, d) float32 L2-normalised. database: (N, d) float32.
        I, D: (nq, >=n) top neighbours of each query and their similarities.
        n: neighbours to aggregate. alpha: weight exponent (alpha = 0 gives average QE).
    Returns: (nq, d) float32 L2-normalised.
    """
    idx = I[:, :n]
    w = np.maximum(D[:, :n], 0.0) ** alpha  # (nq, n)
    q = queries.astype(np.float64) + np.einsum("qn,qnd->qd", w, database[idx].astype(np.float64))
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q.astype(np.float32)
