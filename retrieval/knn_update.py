"""Growing a collection's self-kNN lists without searching old rows against old rows again.

When rows X_new are appended to X_old (ids n_old .. N - 1), the lists of the grown collection are
- for a new row: its top-kk among all N rows;
- for an old row i: its old list merged with the new rows j whose similarity beats its current
  last entry, s_ij > thr_i = D_old[i, kk - 1] (strictly: on a tie the old entry, of lower index,
  ranks first, as a search over the whole collection ranks it).

Exact (`extend_knn`): the product of the new rows with all rows, tile by tile (a worker thread per
core, each with one BLAS thread), each tile read once by a compiled pass that keeps the new rows'
top-kk and, in the same pass, the old rows each new row enters.
The product new x old is computed once and serves both sides (a new row's list and the old rows'
candidates), so the distance work is n_new x N, 1/11 of a rebuild's N^2 when a collection grows by
10%. The result equals a search of the whole collection (ties by lower id).

Approximate (`extend_knn_searched`): the new rows' lists come from an index that holds all rows
(an HNSW or IVF index grown by `add`); an old row's candidates are the new rows that list it
(reverse neighbours), the rule approximate kNN-graph updates use. Its recall is measured like a
build's.

Both merge the old lists with their candidates in place: a counting sort by old row (`_bucket`),
then a compiled merge per row over row ranges in a thread each (numba, the GIL released).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from numba import njit

from .ids import ids_dtype
from .threads import blas_threads, in_ranges

ROWS = 512  # new rows per block: their running lists stay in cache
TILE_FLOATS = 1 << 21  # one product tile (rows, tile) per thread: 8 MB
_CHUNK = 16  # entries tested at once in the compiled scan


@njit(cache=True, nogil=True)
def _sort_desc(vals, idx, m):
    """Insertion sort of the first m entries by similarity descending, ties by lower id."""
    for a in range(1, m):
        v, j = vals[a], idx[a]
        b = a
        while b > 0 and (vals[b - 1] < v or (vals[b - 1] == v and idx[b - 1] > j)):
            vals[b] = vals[b - 1]
            idx[b] = idx[b - 1]
            b -= 1
        vals[b] = v
        idx[b] = j


@njit(cache=True, nogil=True)
def _evict(vals, idx):
    """Position of the entry to evict next: the smallest, among ties the highest id."""
    low = 0
    for t in range(1, vals.shape[0]):
        if vals[t] < vals[low] or (vals[t] == vals[low] and idx[t] > idx[low]):
            low = t
    return low


@njit(cache=True, nogil=True, inline="always")
def _record(cand_i, cand_s, r, c_n, g, s):
    """Old row g entered by new row r (similarity s): kept while the row's buffer has room,
    counted always (a count past the buffer makes the caller scan the block again)."""
    if c_n < cand_i.shape[1]:
        cand_i[r, c_n] = g
        cand_s[r, c_n] = s
    return c_n + 1


@njit(cache=True, nogil=True)
def _scan_tile(T, c0, n_old, thr, vals, idx, filled, cnt, cand_i, cand_s):
    """One tile T (b, ct) of the product of b new rows with rows c0 .. c0 + ct - 1, tiles in
    ascending c0: each row's running top-kk (vals/idx (b, kk), `filled` entries so far) and the
    old rows g it enters, T[r, g - c0] > thr[g] (cnt[r] of them, the first cap in cand_i/cand_s
    (b, cap), ascending g). Chunks of _CHUNK entries are tested branch-free first (one pass for
    both tests), entries one by one only in a chunk with a hit."""
    b, ct = T.shape
    kk = vals.shape[1]
    n_thr = max(0, min(ct, n_old - c0))  # entries c < n_thr are old rows
    for r in range(b):
        row = T[r]
        v, ix = vals[r], idx[r]
        c_n = cnt[r]
        start = 0
        while filled[r] < kk and start < ct:  # the first kk entries of the row fill its list
            s = row[start]
            g = c0 + start
            if g < n_old and s > thr[g]:
                c_n = _record(cand_i, cand_s, r, c_n, g, s)
            v[filled[r]] = s
            ix[filled[r]] = g
            filled[r] += 1
            start += 1
        low = _evict(v, ix) if filled[r] == kk else 0
        a = start
        while a < ct:
            e = min(a + _CHUNK, ct)
            h = np.int32(1)  # a tail, or the chunk where the old rows end: one by one
            if e - a == _CHUNK:
                bar = v[low]
                if e <= n_thr:
                    h = np.int32(0)
                    for c in range(_CHUNK):
                        h |= np.int32(row[a + c] > bar) | np.int32(row[a + c] > thr[c0 + a + c])
                elif a >= n_thr:
                    h = np.int32(0)
                    for c in range(_CHUNK):
                        h |= np.int32(row[a + c] > bar)
            if h:
                for c in range(a, e):
                    s = row[c]
                    g = c0 + c
                    if g < n_old and s > thr[g]:
                        c_n = _record(cand_i, cand_s, r, c_n, g, s)
                    if s > v[low]:  # strictly: on a tie the kept entry (lower id) stays
                        v[low] = s
                        ix[low] = g
                        low = _evict(v, ix)
            a = e
        cnt[r] = c_n


@njit(cache=True, nogil=True)
def _finish(vals, idx, filled, Dn, In, out0):
    """Rows of the running lists, sorted (descending, ties by lower id), into Dn/In[out0 + r]
    (-inf / -1 past the rows there were)."""
    b, kk = vals.shape
    for r in range(b):
        m = filled[r]
        _sort_desc(vals[r], idx[r], m)
        for t in range(kk):
            Dn[out0 + r, t] = vals[r, t] if t < m else -np.inf
            In[out0 + r, t] = idx[r, t] if t < m else -1


@njit(cache=True, nogil=True)
def _merge(D, I, starts, cj, cs, r0, r1):
    """Old rows [r0, r1) of D/I (each sorted, descending) merged in place with their candidates
    cj/cs[starts[i]:starts[i + 1]] (new ids, ascending id): the kk best, ties to the old entry."""
    kk = D.shape[1]
    ov = np.empty(kk, np.float32)
    oi = np.empty(kk, np.int64)
    width = 0
    for i in range(r0, r1):
        width = max(width, starts[i + 1] - starts[i])
    nv = np.empty(width, np.float32)
    ni = np.empty(width, np.int64)
    for i in range(r0, r1):
        m = starts[i + 1] - starts[i]
        if m == 0:
            continue
        for t in range(m):
            nv[t] = cs[starts[i] + t]
            ni[t] = cj[starts[i] + t]
        _sort_desc(nv, ni, m)
        for t in range(kk):
            ov[t] = D[i, t]
            oi[t] = I[i, t]
        a = 0
        b = 0
        for t in range(kk):
            if b >= m or (a < kk and ov[a] >= nv[b]):
                D[i, t] = ov[a]
                I[i, t] = oi[a]
                a += 1
            else:
                D[i, t] = nv[b]
                I[i, t] = ni[b]
                b += 1


def grown_lists(D_old, I_old, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I): (N, kk) float32 / int32 (int64 past 2^31 rows) lists with the old rows' lists
    (n_old, kk) in their first rows, the rest to be filled by `extend_knn` or
    `extend_knn_searched` (which work in place: the lists of a grown collection are held once).
    D_old / I_old: arrays, or functions returning them (e.g. an .npz file's members): each is then
    loaded only when it is copied and dropped after, so at most one old array is held beside the
    new ones (at 10^6 x 51, 0.19 GiB less)."""
    D_old = D_old() if callable(D_old) else D_old
    n_old, kk = D_old.shape
    D = np.empty((N, kk), np.float32)
    D[:n_old] = D_old
    del D_old
    I_old = I_old() if callable(I_old) else I_old
    if I_old.shape != (n_old, kk):
        raise ValueError(f"grown_lists: ids of shape {I_old.shape} for similarities of shape {(n_old, kk)}")
    I = np.empty((N, kk), ids_dtype(N))
    I[:n_old] = I_old
    return D, I


def _check_lists(D: np.ndarray, I: np.ndarray, n_old: int) -> int:
    if D.shape != I.shape or D.ndim != 2 or D.dtype != np.float32 or not D.flags.c_contiguous or not I.flags.c_contiguous:
        raise ValueError(f"kNN lists of shapes {D.shape} / {I.shape}: expected one (N, kk) contiguous pair, float32 similarities")
    kk = D.shape[1]
    if not 0 < kk <= n_old < D.shape[0]:
        raise ValueError(f"kNN lists of width {kk} for {n_old} old rows of {D.shape[0]}: an update needs full old lists and new rows")
    return kk


@njit(cache=True, nogil=True)
def _bucket(ci, cj, cs, n_old):
    """Candidates (old row ci, new row cj, similarity cs), listed by ascending cj, grouped by old
    row (a counting sort, stable: each row's candidates still by ascending cj): (starts (n_old + 1),
    cj, cs) in row order."""
    starts = np.zeros(n_old + 1, np.int64)
    for e in range(ci.shape[0]):
        starts[ci[e] + 1] += 1
    for i in range(n_old):
        starts[i + 1] += starts[i]
    pos = starts[:-1].copy()
    oj = np.empty(ci.shape[0], np.int64)
    os_ = np.empty(ci.shape[0], np.float32)
    for e in range(ci.shape[0]):
        p = pos[ci[e]]
        oj[p] = cj[e]
        os_[p] = cs[e]
        pos[ci[e]] = p + 1
    return starts, oj, os_


@njit(cache=True, nogil=True)
def _reverse(D_new, I_new, n_old, thr):
    """The reverse neighbours of a searched update as candidates (old row ci, new row cj,
    similarity cs) by ascending cj, for `_bucket`: new row n_old + j is a candidate of old row i
    when it lists i with a similarity above thr[i]."""
    m, w = I_new.shape
    total = 0
    for j in range(m):
        for t in range(w):
            i = I_new[j, t]
            if 0 <= i < n_old and D_new[j, t] > thr[i]:
                total += 1
    ci = np.empty(total, np.int64)
    cj = np.empty(total, np.int64)
    cs = np.empty(total, np.float32)
    e = 0
    for j in range(m):
        for t in range(w):
            i = I_new[j, t]
            if 0 <= i < n_old and D_new[j, t] > thr[i]:
                ci[e], cj[e], cs[e] = i, n_old + j, D_new[j, t]
                e += 1
    return ci, cj, cs


def _merge_old(D: np.ndarray, I: np.ndarray, n_old: int, starts: np.ndarray, cj: np.ndarray, cs: np.ndarray, threads: int | None) -> int:
    """Rows [0, n_old) of D/I (the old lists) merged with their candidates cj/cs[starts[i]:
    starts[i + 1]]; returns the number of rows that had any."""
    in_ranges(lambda a, b: _merge(D, I, starts, cj, cs, a, b), n_old, threads)
    return int(np.count_nonzero(np.diff(starts)))


def extend_knn(D: np.ndarray, I: np.ndarray, X: np.ndarray, n_old: int, *, tile_floats: int = TILE_FLOATS,
               threads: int | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Exact self-kNN lists of the rows of X, in place, from the lists of its first n_old rows.

    Args:
        D, I: (N, kk) lists (`grown_lists`): rows [0, n_old) hold the self-kNN of X[:n_old]
           (similarities descending, self included, kk <= n_old); all rows are written here.
        X: (N, d) float32 rows, the old ones first (contiguous: else a copy is made).
        n_old: rows the old lists cover.
        tile_floats: size of one product tile (new rows x rows of X).
        progress: called with the number of new rows done, block by block (from worker threads).
    Returns: the number of old rows whose list took a new row. D/I then equal a search of the
    whole collection up to rounding of the dot products and ties (lower id first).
    """
    kk = _check_lists(D, I, n_old)
    X = np.ascontiguousarray(X, dtype=np.float32)
    N = X.shape[0]
    if N != D.shape[0]:
        raise ValueError(f"extend_knn: {N} rows for lists of {D.shape[0]}")
    thr = np.ascontiguousarray(D[:n_old, kk - 1])
    rows = max(1, min(N - n_old, ROWS))
    tile = max(1, min(N, tile_floats // rows))
    starts = list(range(n_old, N, rows))
    found: dict[int, tuple] = {}

    def blocks(w: int, workers: int) -> None:
        """Row blocks w, w + workers, ... in this thread, tile by tile: each product tile (one
        BLAS thread) is scanned while it is still in cache."""
        T = np.empty((rows, tile), np.float32)
        for a in starts[w::workers]:
            b = min(a + rows, N) - a
            cap = 8 * kk  # old lists one new row enters (a hub more: the block again)
            while True:
                vals, idx = np.empty((b, kk), np.float32), np.empty((b, kk), np.int64)
                filled, cnt = np.zeros(b, np.int64), np.zeros(b, np.int64)
                cand_i, cand_s = np.empty((b, cap), np.int64), np.empty((b, cap), np.float32)
                for c0 in range(0, N, tile):
                    c1 = min(c0 + tile, N)
                    Tb = T[:b, : c1 - c0]
                    np.matmul(X[a : a + b], X[c0:c1].T, out=Tb)
                    _scan_tile(Tb, c0, n_old, thr, vals, idx, filled, cnt, cand_i, cand_s)
                if cnt.max(initial=0) <= cap:
                    break
                cap = int(cnt.max())  # a hub entered more old lists than the buffer holds: this block again
            _finish(vals, idx, filled, D, I, a)
            keep = np.arange(cap)[None, :] < cnt[:, None]
            found[a] = (cand_i[keep], a + np.nonzero(keep)[0], cand_s[keep])
            if progress is not None:
                progress(b)

    workers = max(1, min(threads or os.cpu_count() or 1, len(starts)))
    with blas_threads(1):  # one product per core, not one product split across cores (its idle threads spin)
        in_ranges(lambda w0, w1: [blocks(w, workers) for w in range(w0, w1)], workers, workers)
    cis, cjs, css = zip(*(found[a] for a in starts))
    return _merge_old(D, I, n_old, *_bucket(np.concatenate(cis), np.concatenate(cjs), np.concatenate(css), n_old), threads)


def extend_knn_searched(D: np.ndarray, I: np.ndarray, n_old: int, D_new: np.ndarray, I_new: np.ndarray, *,
                        threads: int | None = None) -> int:
    """Approximate self-kNN lists of a grown collection, in place: the new rows' lists as
    searched in an index holding all N rows, the old lists merged with their reverse neighbours
    among the new rows (new row j listing old row i with s > thr_i).

    Args:
        D, I: (N, kk) lists (`grown_lists`), rows [0, n_old) holding the old rows' lists.
        D_new, I_new: (N - n_old, w) lists of the new rows (ids n_old .. N - 1, -1 where the index
           found none), w >= kk: the first kk entries become the new rows' lists, all w are
           reverse candidates (a longer search lists more of the old rows a new row enters).
    Returns: the number of old rows whose list took a new row.
    """
    kk = _check_lists(D, I, n_old)
    if D_new.shape != I_new.shape or D_new.ndim != 2 or D_new.shape[0] != D.shape[0] - n_old or D_new.shape[1] < kk:
        raise ValueError(f"new kNN lists of shapes {D_new.shape} / {I_new.shape}; expected {D.shape[0] - n_old} rows of width >= {kk}")
    D[n_old:], I[n_old:] = D_new[:, :kk], I_new[:, :kk]
    thr = np.ascontiguousarray(D[:n_old, kk - 1])
    candidates = _reverse(np.ascontiguousarray(D_new, dtype=np.float32), np.ascontiguousarray(I_new), n_old, thr)
    return _merge_old(D, I, n_old, *_bucket(*candidates, n_old), threads)
