"""Float rows kept on disk and read a block at a time: a stage's descriptors out of its memory.

`RowFile.create(path, X)` writes X ((n, d) float32) as a .npy file; the returned reader answers
`shape`, `dtype`, `len()`, `rows[a:b]` (a contiguous range, or an array of row numbers) and
`read_into(a, b, buffer)` by reading only those rows (`os.preadv` into a fresh array or the given
buffer: no memory map, so rows once read do not stay in the process; the kernel's page cache may
keep the file, as it keeps any file, and gives it back under pressure). `retrieval.row_blocks` takes such a reader wherever it takes an array.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RowFile:
    """The rows of a .npy file of a 2-D C-ordered float32 array, read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = -1
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if major == 1 else np.lib.format.read_array_header_2_0(f))
            self._offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise ValueError(f"{self.path}: not a C-ordered 2-D float32 array (shape {shape}, dtype {dtype})")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.float32)
        self._row_bytes = 4 * self.shape[1]
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def create(cls, path: str | Path, X: np.ndarray) -> "RowFile":
        """Write X ((n, d) float32) to `path` (.npy) and open it."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"RowFile: rows must be 2-D (n, d), got shape {X.shape}")
        try:
            with open(path, "wb") as f:
                np.lib.format.write_array(f, X, allow_pickle=False)
        except BaseException:
            Path(path).unlink(missing_ok=True)  # a disk that filled up keeps no half-written file
            raise
        return cls(path)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, a: int, b: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        want, got = (b - a) * self._row_bytes, 0
        while got < want:
            n = os.preadv(self._fd, [view[got:want]], self._offset + a * self._row_bytes + got)
            if n <= 0:
                raise OSError(f"{self.path}: short read at row {a} ({got} of {want} bytes)")
            got += n

    def read_into(self, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """Rows [a, b) read into out[:b - a] (a reused buffer: no fresh pages per block); that view."""
        n, d = self.shape
        if not (0 <= a <= b <= n) or out.dtype != np.float32 or out.shape[1:] != (d,) or len(out) < b - a or not out.flags.c_contiguous:
            raise ValueError(f"RowFile.read_into: rows [{a}, {b}) of {n} into an array of shape {out.shape}")
        if b > a:
            self._read(a, b, out[:b - a])
        return out[:b - a]

    def __getitem__(self, key) -> np.ndarray:
        n, d = self.shape
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise IndexError("RowFile: slices must be contiguous")
            out = np.empty((max(0, b - a), d), np.float32)
            if b > a:
                self._read(a, b, out)
            return out
        rows = np.asarray(key, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"RowFile: rows out of range [0, {n})")
        out = np.empty((rows.size, d), np.float32)
        for i, r in enumerate(rows):
            self._read(int(r), int(r) + 1, out[i:i + 1])
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
