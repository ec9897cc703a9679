"""What an iterative solve reports per right-hand side (block CG, the compiled solvers, PETSc)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SolveStats:
    """Per right-hand side: iterations run, final relative residual ||b - Ax|| / ||b||, converged."""

    iterations: np.ndarray  # (m,) int64
    residuals: np.ndarray  # (m,) float64
    converged: np.ndarray  # (m,) bool
