"""Retrieval network for fine-tuning: CNN backbone -> GeM (learnable p) -> L2 [-> whitening -> L2].

The whitening layer is a linear map initialised from a learned `Whitening` (x -> P (x - m)), as
in Radenovic et al. (cnnimageretrieval-pytorch), and trained with the rest. Batch-norm layers stay
in eval mode (frozen ImageNet statistics): tuples are small batches, and frozen statistics keep a
step's gradient independent of how the batch is split over DDP workers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .pooling import GeM, l2n
from .whitening import Whitening


class RetrievalHead(nn.Module):
    """(B, C, h, w) feature maps -> (B, D) L2-normalised descriptors: GeM, L2, optional whitening, L2."""

    def __init__(self, in_channels: int, *, p: float = 3.0, learn_p: bool = True, whiten_dim: int = 0):
        super().__init__()
        self.pool = GeM(p=p, learnable=learn_p)
        self.whiten = nn.Linear(in_channels, whiten_dim, bias=True) if whiten_dim > 0 else None
        self.out_dim = whiten_dim if whiten_dim > 0 else in_channels

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        v = l2n(self.pool(fmap))
        if self.whiten is not None:
            v = l2n(self.whiten(v))
        return v


class RetrievalNet(nn.Module):
    """Backbone with `features(x) -> (B, C, h, w)` and `out_channels`, plus a `RetrievalHead`.

    Exposes `features`, `out_channels`, `input_mean`, `input_std` like a plain backbone, and
    `retrieval_head` so extraction pools with the learned head instead of a configured pooling.
    `arch` describes the architecture; a checkpoint loads only into the same `arch`.
    """

    def __init__(self, backbone: nn.Module, *, backbone_name: str, p: float = 3.0, learn_p: bool = True, whiten_dim: int = 0):
        super().__init__()
        _drop_classifier(backbone)
        self.backbone = backbone
        self.retrieval_head = RetrievalHead(int(backbone.out_channels), p=p, learn_p=learn_p, whiten_dim=whiten_dim)
        self.out_channels = int(backbone.out_channels)
        self.input_mean = getattr(backbone, "input_mean", (0.0, 0.0, 0.0))
        self.input_std = getattr(backbone, "input_std", (1.0, 1.0, 1.0))
        self.arch = {"backbone": backbone_name, "in_channels": self.out_channels, "whiten_dim": int(whiten_dim),
                     "learn_p": bool(learn_p), "head": "gem-l2" + ("-whiten-l2" if whiten_dim > 0 else "")}

    @property
    def out_dim(self) -> int:
        return self.retrieval_head.out_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> backbone feature maps (B, C, h, w)."""
        return self.backbone.features(x)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """The backbone's convolution + BatchNorm pairs (see `retrieval.backbones.fold_batchnorm`)."""
        return self.backbone.conv_bn_pairs() if hasattr(self.backbone, "conv_bn_pairs") else []

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB, or a list of B (3, H_i, W_i) images of any sizes (forwarded
        in groups of equal size, in one call: DDP needs one forward per backward) -> (B, out_dim)
        float32 L2-normalised descriptors."""
        if isinstance(x, torch.Tensor):
            return self.retrieval_head(self.features(x))
        return _by_shape(x, lambda b: self.retrieval_head(self.features(b)))

    def pooled(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of B images -> (B, in_channels) GeM + L2 descriptors, before the whitening layer."""
        return _by_shape(x, lambda b: l2n(self.retrieval_head.pool(self.features(b))))

    def train(self, mode: bool = True) -> "RetrievalNet":
        super().train(mode)
        for m in self.modules():  # frozen batch-norm statistics, see the module docstring
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def _by_shape(images: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn on stacks of same-sized (3, H, W) images; rows returned in the input order."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    outs, order = [], []
    for idx in groups.values():
        outs.append(fn(torch.stack([images[i] for i in idx])))
        order += idx
    V = torch.cat(outs)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.as_tensor(order)] = torch.arange(len(order))
    return V[inv.to(V.device)]


def _drop_classifier(backbone: nn.Module) -> None:
    """Replace the ImageNet classifier (unused by `features`) with Identity: DDP all-reduces only
    when every parameter got a gradient, and checkpoints need not carry it."""
    for owner, attr in ((backbone, "_fc"), (getattr(backbone, "net", None), "fc"), (getattr(backbone, "net", None), "classifier")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.Module):
            setattr(owner, attr, nn.Identity())


def init_whitening(head: RetrievalHead, w: Whitening) -> None:
    """Set the head's whitening layer to x -> P (x - m) of a learned whitening ((d_out, d) proj)."""
    if head.whiten is None:
        raise ValueError("init_whitening: the head has no whitening layer (whiten_dim = 0)")
    if tuple(head.whiten.weight.shape) != tuple(w.proj.shape):
        raise ValueError(f"init_whitening: layer is {tuple(head.whiten.weight.shape)}, whitening is {tuple(w.proj.shape)}")
    P = torch.as_tensor(w.proj, dtype=torch.float32)
    with torch.no_grad():
        head.whiten.weight.copy_(P)
        head.whiten.bias.copy_(-(P @ torch.as_tensor(w.mean, dtype=torch.float32)))


def freeze_prefix(net: RetrievalNet, n_blocks: int) -> int:
    """Freeze the first n_blocks of an EfficientNet-Lite backbone (stem included when n_blocks > 0),
    or of any backbone with a `_blocks` list; returns the number of parameters frozen."""
    bb = net.backbone
    if n_blocks <= 0:
        return 0
    if not hasattr(bb, "_blocks"):
        raise ValueError(f"freeze_prefix: backbone {type(bb).__name__} has no `_blocks` to freeze")
    mods = [getattr(bb, "_conv_stem"), getattr(bb, "_bn0")] + list(bb._blocks[:n_blocks])
    count = 0
    for m in mods:
        for prm in m.parameters():
            prm.requires_grad_(False)
            count += prm.numel()
    return count
