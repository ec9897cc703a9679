"""Retrieval metrics, exactly as the official Revisited Oxford/Paris evaluation defines them.

`compute_ap` integrates precision over recall steps with the trapezoid rule: for the j-th positive
(0-based) at rank r (0-based, junk removed), precision before it is j / r (1 when r = 0) and after
it (j + 1) / (r + 1); each positive contributes the mean of the two times 1 / n_positives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

REVISITED_PROTOCOLS = ("E", "M", "H")


def compute_ap(ranks: np.ndarray, npos: int) -> float:
    """Average precision from the 0-based, sorted ranks of the retrieved positives.

    Args:
        ranks: (m,) int, ascending positions of the positives found in the ranking (junk removed).
        npos: total number of positives for the query (>= m); missing ones contribute 0.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if npos <= 0:
        raise ValueError("npos must be positive")
    j = np.arange(ranks.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(ranks == 0, 1.0, j / np.where(ranks == 0, 1.0, ranks))
    p1 = (j + 1.0) / (ranks + 1.0)
    return float(((p0 + p1) / 2.0).sum() / npos)


def positive_positions(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of `positives` in `ranking` after removing `junk` items from it.

    Args:
        ranking: (n,) int ids, best first (may be truncated).
        positives, junk: int ids.
    Returns: (m,) int64 ascending positions; positives absent from `ranking` are omitted.
    """
    ranking = np.asarray(ranking)
    keep = ~np.isin(ranking, junk)
    filtered = ranking[keep]
    return np.flatnonzero(np.isin(filtered, positives)).astype(np.int64)


@dataclass(frozen=True)
class MapResult:
    """mAP and mean precision@k over queries with at least one positive (values in [0, 1])."""

    map: float
    aps: np.ndarray  # (nq,) float64, NaN for queries with no positives
    mpk: np.ndarray  # (len(kappas),) float64
    prs: np.ndarray  # (nq, len(kappas)) float64


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = (1, 5, 10),
) -> MapResult:
    """mAP and mP@k as in the official `compute_map`.

    Args:
        ranks: (n, nq) int, column i is the ranking (database indices, best first) of query i.
        gnd: per query a mapping with 'ok' (positives) and optionally 'junk' (ignored) indices.
        kappas: cut-offs for precision@k.
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks must be (n, {nq}), got {ranks.shape}")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            continue
        junk = np.asarray(g.get("junk", ()), dtype=np.int64).ravel()
        pos = positive_positions(ranks[:, i], ok, junk)
        aps[i] = compute_ap(pos, ok.size)
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k) if pos1.size else k
            prs[i, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive")
    return MapResult(float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs)


def revisited_gnd(gnd: Sequence[Mapping[str, Sequence[int]]], protocol: str) -> list[dict]:
    """Per-query positives/junk for a Revisited protocol: 'E', 'M' or 'H'.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.
    """
    out = []
    for g in gnd:
        easy, hard, junk = (list(np.asarray(g.get(k, ()), dtype=np.int64).ravel()) for k in ("easy", "hard", "junk"))
        if protocol == "E":
            out.append({"ok": easy, "junk": junk + hard})
        elif protocol == "M":
            out.append({"ok": easy + hard, "junk": junk})
        elif protocol == "H":
            out.append({"ok": hard, "junk": junk + easy})
        else:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {REVISITED_PROTOCOLS}")
    return out


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, MapResult]:
    """Revisited Oxford/Paris evaluation: {'E': MapResult, 'M': ..., 'H': ...}."""
    return {p: compute_map(ranks, revisited_gnd(gnd, p), kappas) for p in REVISITED_PROTOCOLS}


def precision_recall_curve(ranks: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]],
                           recall_levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision at fixed recall levels over queries with positives (junk removed
    from each ranking as in compute_map).

    Args:
        ranks: (nq, n) int database indices, best first (rows may be truncated).
        gnd: per query {"ok": positives, "junk": ignored}.
        recall_levels: (L,) in [0, 1]; default 0, 0.05, ..., 1.
    Returns: (recall_levels (L,), precision (L,) float64 in [0, 1]); the interpolated precision at
    recall r is the best precision at any recall >= r (0 where the ranking never reaches r).
    """
    levels = np.linspace(0.0, 1.0, 21) if recall_levels is None else np.asarray(recall_levels, np.float64)
    curves = []
    for q, g in enumerate(gnd):
        pos = np.asarray(g.get("ok", ()), np.int64)
        if pos.size == 0:
            continue
        found = positive_positions(ranks[q], pos, np.asarray(g.get("junk", ()), np.int64))
        if found.size == 0:
            curves.append(np.zeros_like(levels))
            continue
        recall = np.arange(1, found.size + 1) / pos.size
        precision = np.arange(1, found.size + 1) / (found + 1.0)
        best = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
        idx = np.searchsorted(recall, levels, side="left")
        curves.append(np.where(idx < found.size, best[np.minimum(idx, found.size - 1)], 0.0))
    return levels, (np.mean(curves, axis=0) if curves else np.zeros_like(levels))
