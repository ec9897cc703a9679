"""Training tuples mined without labels (Iscen et al., "Mining on Manifolds", CVPR 2018).

For an anchor, the kNN graph's diffusion (the manifold) and plain inner-product search (Euclidean,
on L2-normalised rows) disagree in two useful ways:
- hard positives: images the diffusion ranks high but that are not among the anchor's nearest
  Euclidean neighbours (the same object seen very differently, reached along the manifold);
- hard negatives: images that are Euclidean-near but that the diffusion ranks low (look alike,
  yet not connected to the anchor on the manifold).
`random_tuples` is the baseline without the manifold: a positive drawn among the anchor's nearest
Euclidean neighbours (the only label-free positive there is) and negatives drawn at random.
Arrays in, arrays out; randomness only from the `numpy.random.Generator` passed in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .diffusion import diffusion_scores
from .graph import graph_from_knn
from .knn import knn_search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuples:
    """Mined tuples: anchors (T,) int64, positives (T,) int64, negatives (T, K) int64 row indices."""

    anchors: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.anchors.shape[0])

    def as_array(self) -> np.ndarray:
        """(T, 2 + K) int64: anchor, positive, negatives."""
        return np.concatenate([self.anchors[:, None], self.positives[:, None], self.negatives], axis=1).astype(np.int64)

    @staticmethod
    def from_array(a: np.ndarray) -> "Tuples":
        a = np.asarray(a, dtype=np.int64)
        return Tuples(a[:, 0].copy(), a[:, 1].copy(), a[:, 2:].copy())


def _empty(n_neg: int, stats: dict) -> Tuples:
    return Tuples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_neg), np.int64), stats)


def manifold_tuples(
    X: np.ndarray,
    *,
    n_tuples: int,
    n_neg: int,
    rng: np.random.Generator,
    k: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    kq: int = 1,
    euclid_k: int = 5,
    pos_k: int = 20,
    neg_pool: int = 50,
    neg_exclude_k: int = 50,
    batch: int = 256,
) -> Tuples:
    """Tuples (anchor, hard positive, n_neg hard negatives) mined on the manifold of X.

    Args:
        X: (n, d) float32 L2-normalised descriptors of the training pool (current network).
        n_tuples: tuples wanted (fewer are returned, with a warning, if too few anchors qualify).
        n_neg: negatives per tuple. rng: source of the anchor order and of the positive's choice.
        k, gamma: reciprocal kNN graph (retrieval.graph); alpha: diffusion; kq: the anchor's top-kq
            Euclidean neighbours (itself first) seed its diffusion.
        euclid_k: an anchor's nearest Euclidean neighbours, never used as positives (too easy).
        pos_k: positives are drawn among the top pos_k by diffusion score (minus the euclid_k ones).
        neg_pool: negatives are the nearest Euclidean neighbours among the top neg_pool that are not
            in the diffusion's top neg_exclude_k (nor reached with a score above the positive's);
            the n_neg hardest (most similar) are kept.
        batch: anchors diffused per block CG solve.
    Returns: Tuples; stats has candidates tried, skipped for no positive / too few negatives.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if n < 3 or n_tuples <= 0:
        return _empty(n_neg, {"candidates": 0})
    kk = min(n, max(k, euclid_k, neg_pool, kq) + 1)
    D, I = knn_search(X, X, kk)
    W, gst = graph_from_knn(D[:, : min(k + 1, kk)], I[:, : min(k + 1, kk)], gamma=gamma)
    order = rng.permutation(n)
    anchors, positives, negatives = [], [], []
    stats = {"candidates": 0, "no_positive": 0, "few_negatives": 0, "graph_isolated": int(gst.isolated)}
    for start in range(0, n, batch):
        if len(anchors) >= n_tuples:
            break
        cand = order[start : start + batch]
        S, _ = diffusion_scores(W, D[cand, :kq], I[cand, :kq], alpha=alpha, gamma=gamma)  # (b, n)
        for row, a in enumerate(cand):
            if len(anchors) >= n_tuples:
                break
            stats["candidates"] += 1
            s = S[row].copy()
            s[a] = -np.inf
            reached = np.flatnonzero(s > 0)
            mrank = reached[np.argsort(-s[reached], kind="stable")]  # manifold ranking (reached nodes only)
            euclid = I[a][I[a] != a]
            pos_cand = np.setdiff1d(mrank[:pos_k], euclid[:euclid_k], assume_unique=True)
            if pos_cand.size == 0:
                stats["no_positive"] += 1
                continue
            p = int(rng.choice(pos_cand))
            excluded = set(mrank[:neg_exclude_k].tolist()) | {p}
            negs = [int(j) for j in euclid[:neg_pool] if int(j) not in excluded and s[j] < s[p]][:n_neg]
            if len(negs) < n_neg:
                stats["few_negatives"] += 1
                continue
            anchors.append(int(a))
            positives.append(p)
            negatives.append(negs)
    if len(anchors) < n_tuples:
        log.warning("mining: only %d of %d tuples found (%s)", len(anchors), n_tuples, stats)
    if not anchors:
        return _empty(n_neg, stats)
    stats["tuples"] = len(anchors)
    return Tuples(np.array(anchors, np.int64), np.array(positives, np.int64), np.array(negatives, np.int64).reshape(-1, n_neg), stats)


def random_tuples(X: np.ndarray, *, n_tuples: int, n_neg: int, rng: np.random.Generator, euclid_k: int = 5) -> Tuples:
    """Baseline tuples without the manifold: random anchors, the positive drawn among the anchor's
    euclid_k nearest Euclidean neighbours, n_neg negatives drawn uniformly from the other rows.

    Args: X (n, d) float32 L2-normalised descriptors; n_tuples (anchors are distinct while
    n_tuples <= n); n_neg; rng. Returns: Tuples.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if n < n_neg + 2:
        raise ValueError(f"random_tuples: {n} rows cannot give 1 anchor + 1 positive + {n_neg} negatives")
    _, I = knn_search(X, X, min(n, euclid_k + 1))
    anchors = rng.permutation(n)[:n_tuples] if n_tuples <= n else rng.integers(0, n, n_tuples)
    positives, negatives = [], []
    for a in anchors:
        nb = I[a][I[a] != a][:euclid_k]
        p = int(rng.choice(nb))
        others = np.setdiff1d(np.arange(n), [a, p], assume_unique=False)
        negatives.append(rng.choice(others, size=n_neg, replace=False))
        positives.append(p)
    return Tuples(np.asarray(anchors, np.int64), np.array(positives, np.int64), np.array(negatives, np.int64).reshape(-1, n_neg),
                  {"tuples": int(len(anchors))})


MINERS = {"manifold": manifold_tuples, "random": random_tuples}


def mine_tuples(kind: str, X: np.ndarray, *, n_tuples: int, n_neg: int, rng: np.random.Generator, **kwargs) -> Tuples:
    """Miner by name ("manifold" or "random"); kwargs go to it (random takes only euclid_k)."""
    if kind not in MINERS:
        raise ValueError(f"unknown miner {kind!r}; known: {sorted(MINERS)}")
    if kind == "random":
        kwargs = {k: v for k, v in kwargs.items() if k == "euclid_k"}
    return MINERS[kind](X, n_tuples=n_tuples, n_neg=n_neg, rng=rng, **kwargs)
