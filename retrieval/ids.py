"""Integer width of node ids and positions: 32-bit while they fit (half the memory and cache
footprint of kNN lists, graph indices and solver scratch), 64-bit past 2^31."""
from __future__ import annotations

import numpy as np


def ids_dtype(n: int) -> type:
    """np.int32 for values below n < 2^31, else np.int64."""
    return np.int32 if n < 2**31 else np.int64
