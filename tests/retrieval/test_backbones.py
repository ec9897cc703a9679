"""Inference backbones: BatchNorm folded into convolutions, channels-last layout, TF "same" padding."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.backbones import fold_batchnorm, make_backbone
from retrieval.efficientnet_lite import SameConv2d
from retrieval.finetune_net import RetrievalNet


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode model whose BatchNorms carry non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name,side", [("efficientnet_lite0", 77), ("resnet50", 64), ("vgg16", 40)])
def test_folded_backbone_gives_the_same_features(name, side):
    ref = _randomised(make_backbone(name))
    folded = copy.deepcopy(ref)
    n = fold_batchnorm(folded)
    assert n == {"efficientnet_lite0": 2 + 16 * 2 + 15, "resnet50": 1 + 16 * 3 + 4, "vgg16": 0}[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, side, side + 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.features(x)
        got = folded.to(memory_format=torch.channels_last).features(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_folding_a_finetuned_net_folds_its_backbone_and_refuses_training_mode():
    net = RetrievalNet(_randomised(make_backbone("efficientnet_lite0")), backbone_name="efficientnet_lite0").eval()
    ref = copy.deepcopy(net)
    assert fold_batchnorm(net) == 49
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), ref.features(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(make_backbone("efficientnet_lite0").train())


@pytest.mark.parametrize("k,stride,h,w", [(3, 1, 9, 10), (5, 2, 9, 10), (3, 2, 8, 8), (5, 2, 12, 7), (1, 1, 5, 5)])
def test_same_padding_matches_tensorflow(k, stride, h, w):
    conv = SameConv2d(4, 4, k, stride=stride, groups=4, bias=True)
    x = torch.randn(1, 4, h, w)
    ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + k - w, 0)
    want = F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), conv.weight, conv.bias, stride, 0, 1, 4)
    got = conv(x)
    assert got.shape == (1, 4, math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(got, want)
