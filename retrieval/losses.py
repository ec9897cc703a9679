"""Metric-learning losses for fine-tuning retrieval networks: pure functions on descriptor tensors.

Tuples follow cnnimageretrieval-pytorch: one anchor, one positive and `K` negatives. Descriptors
are rows, normally L2-normalised (distances then lie in [0, 2]).
"""
from __future__ import annotations

import torch


def _check_tuple(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> None:
    if anchor.ndim != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor and positive must both be (B, D), got {tuple(anchor.shape)} and {tuple(positive.shape)}")
    if negatives.ndim != 3 or negatives.shape[0] != anchor.shape[0] or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(f"negatives must be (B, K, D) with B, D = {tuple(anchor.shape)}, got {tuple(negatives.shape)}")


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *, margin: float = 0.7,
                     reduction: str = "mean") -> torch.Tensor:
    """Contrastive (siamese) loss of pairs (Hadsell et al.; Radenovic et al.):

        l_ij = t_ij ||x_i - y_j||^2 + (1 - t_ij) [m - ||x_i - y_j||]_+^2

    Args: x, y: (P, D) float paired descriptors; target: (P,) 1 for a matching pair, 0 for a
    non-matching one; margin: keyword-only m; reduction: "mean", "sum" or "none".
    Returns: scalar, or (P,) per-pair losses with reduction="none".
    """
    if x.shape != y.shape or x.ndim != 2 or target.shape != x.shape[:1]:
        raise ValueError(f"contrastive_loss: x, y (P, D) and target (P,), got {tuple(x.shape)}, {tuple(y.shape)}, {tuple(target.shape)}")
    t = target.to(x.dtype)
    d2 = (x - y).pow(2).sum(dim=1)
    # sqrt has an infinite derivative at 0: only non-matching pairs need the distance itself
    d = torch.sqrt(d2.clamp(min=1e-12))
    loss = t * d2 + (1 - t) * torch.clamp(margin - d, min=0).pow(2)
    return _reduce(loss, reduction)


def tuple_contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, *, margin: float = 0.7,
                           reduction: str = "mean") -> torch.Tensor:
    """Contrastive loss of tuples: the pair (anchor, positive) with t = 1 and each (anchor, negative_k)
    with t = 0, summed over the tuple's 1 + K pairs (as cirtorch's ContrastiveLoss on a tuple).

    Args: anchor, positive: (B, D); negatives: (B, K, D). Returns a scalar (mean/sum over tuples)
    or (B,) per-tuple losses with reduction="none".
    """
    _check_tuple(anchor, positive, negatives)
    B, K, D = negatives.shape
    pos = contrastive_loss(anchor, positive, torch.ones(B, dtype=anchor.dtype, device=anchor.device), margin=margin, reduction="none")
    a = anchor[:, None, :].expand(B, K, D).reshape(B * K, D)
    neg = contrastive_loss(a, negatives.reshape(B * K, D), torch.zeros(B * K, dtype=anchor.dtype, device=anchor.device),
                           margin=margin, reduction="none").view(B, K)
    return _reduce(pos + neg.sum(dim=1), reduction)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, *, margin: float = 0.1,
                 reduction: str = "mean") -> torch.Tensor:
    """Triplet loss with K negatives per anchor: sum_k [m + ||a - p||^2 - ||a - n_k||^2]_+ .

    Args: anchor, positive: (B, D); negatives: (B, K, D). Returns a scalar (mean/sum over tuples)
    or (B,) per-tuple losses with reduction="none".
    """
    _check_tuple(anchor, positive, negatives)
    dp = (anchor - positive).pow(2).sum(dim=1)  # (B,)
    dn = (anchor[:, None, :] - negatives).pow(2).sum(dim=2)  # (B, K)
    loss = torch.clamp(margin + dp[:, None] - dn, min=0).sum(dim=1)
    return _reduce(loss, reduction)


LOSSES = {"contrastive": tuple_contrastive_loss, "triplet": triplet_loss}


def tuple_loss(name: str, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, *, margin: float,
               reduction: str = "mean") -> torch.Tensor:
    """Loss by name ("contrastive" or "triplet") on (B, D), (B, D), (B, K, D) tuples."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name](anchor, positive, negatives, margin=margin, reduction=reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
