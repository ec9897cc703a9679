"""Global pooling of CNN feature maps: pure functions with thin `nn.Module` wrappers.

All functions take (B, C, H, W) non-negative activations and return (B, C) descriptors
(not normalised; see `l2n`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: max over locations."""
    return torch.amax(x, dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (average over locations)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, *, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean (Radenovic et al.): (mean x^p)^(1/p); p = 1 is SPoC, p -> inf is MAC."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise rows of (B, D)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


class GeM(nn.Module):
    """GeM pooling with a fixed or learnable exponent p."""

    def __init__(self, *, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p, eps=self.eps)


class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


POOLINGS = {"mac": MAC, "spoc": SPoC, "gem": GeM}


def make_pooling(name: str, **kwargs) -> nn.Module:
    """Pooling module by name ('mac', 'spoc', 'gem'); kwargs go to its constructor."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; known: {sorted(POOLINGS)}")
    return POOLINGS[name](**kwargs)
