import numpy as np
import pytest
import torch

from retrieval.efficientnet_lite import EfficientNetLite
from retrieval.pooling import GeM, gem, l2n, mac, make_pooling, spoc
from retrieval.whitening import learn_pca_whitening


def test_gem_p1_equals_spoc():
    x = torch.rand(2, 5, 7, 3)
    torch.testing.assert_close(gem(x, p=1.0), spoc(x))


def test_gem_large_p_approaches_mac():
    x = torch.rand(2, 5, 7, 3) + 0.1
    assert torch.allclose(gem(x, p=200.0), mac(x), rtol=2e-2)


def test_closed_forms():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x[0, 1] = 2.0
    torch.testing.assert_close(mac(x), torch.tensor([[4.0, 2.0]]))
    torch.testing.assert_close(spoc(x), torch.tensor([[2.5, 2.0]]))
    torch.testing.assert_close(gem(x, p=2.0, eps=0.0), torch.tensor([[np.sqrt(7.5), 2.0]], dtype=torch.float32))
    torch.testing.assert_close(torch.linalg.vector_norm(l2n(torch.rand(3, 4)), dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_gem_learnable_p_gets_gradient():
    pool = GeM(p=3.0, learnable=True)
    pool(torch.rand(1, 3, 4, 4) + 0.1).sum().backward()
    assert pool.p.grad is not None
    with pytest.raises(ValueError, match="unknown pooling"):
        make_pooling("nope")


def test_pca_whitening_gives_identity_covariance(rng):
    X = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 3.0
    w = learn_pca_whitening(X, shrinkage=0.0)
    Z = (X - w.mean) @ w.proj.T
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(12), atol=1e-8)
    Y = w.apply(X)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, atol=1e-5)
    w8 = learn_pca_whitening(X, dim=8)
    assert w8.apply(X).shape == (500, 8)


def test_efficientnet_lite_feature_shape():
    m = EfficientNetLite("efficientnet_lite0").eval()
    with torch.no_grad():
        f = m.features(torch.rand(1, 3, 100, 150))
    assert f.shape == (1, 1280, 4, 5) and (f >= 0).all()
