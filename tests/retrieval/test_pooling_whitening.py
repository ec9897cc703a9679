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


def test_rmac_region_grid_matches_published_layout():
    from retrieval.pooling import rmac_regions

    sq = rmac_regions(7, 7, 3)  # square map: l x l regions of side floor(2*7/(l+1))
    assert [r[2] for r in sq] == [7] + [4] * 4 + [3] * 9
    assert sq[1:5] == [(0, 0, 4, 4), (0, 3, 4, 4), (3, 0, 4, 4), (3, 3, 4, 4)]
    wide = rmac_regions(7, 10, 3)  # 10 wide: one extra region along the long side (overlap 0.57 is closest to 0.4)
    assert len(wide) == 2 + 6 + 12
    assert wide[:2] == [(0, 0, 7, 7), (0, 3, 7, 7)]
    tall = rmac_regions(10, 7, 3)
    assert len(tall) == 20 and tall[1] == (3, 0, 7, 7)
    assert len(rmac_regions(30, 40, 3)) == 1 * 2 + 2 * 3 + 3 * 4


def test_rmac_crow_fs_closed_forms():
    from retrieval.pooling import crow, fs_pooling, rmac, rmac_regional

    x = torch.rand(2, 6, 7, 9)
    v, regions = rmac_regional(x)
    assert v.shape == (2, len(regions), 6)
    torch.testing.assert_close(torch.linalg.vector_norm(v, dim=-1), torch.ones(2, len(regions)), atol=1e-4, rtol=0)
    torch.testing.assert_close(rmac(x), v.sum(1))
    # a constant map: every region's MAC is the same unit vector
    c = torch.ones(1, 4, 6, 6)
    torch.testing.assert_close(l2n(rmac(c)), torch.full((1, 4), 0.5))
    # CroW where every channel is active everywhere and the channel sum is the same at every
    # location: equal channel weights and uniform spatial weights -> proportional to SPoC
    pos = (torch.rand(1, 5, 1, 1) + 0.5).expand(1, 5, 4, 4) + torch.tensor([1.0, -1.0, 0, 0, 0]).view(1, 5, 1, 1) * torch.rand(1, 1, 4, 4) * 0.2
    torch.testing.assert_close(l2n(crow(pos)), l2n(spoc(pos)), atol=1e-5, rtol=0)
    sparse = pos.clone()
    sparse[0, 0, :2] = 0  # channel 0 active on half the map: CroW up-weights it relative to SPoC
    assert (l2n(crow(sparse))[0, 0] / l2n(spoc(sparse))[0, 0]) > 1.05
    # FS: a channel active everywhere gets weight -log(1) = 0; the saliency comes from sparse channels
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = 1.0  # dense channel
    x[0, 1, 1, 1] = 2.0  # sparse channel, one location
    out = fs_pooling(x)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0]]), atol=1e-4, rtol=0)
    for name in ("rmac", "crow", "fs"):
        assert make_pooling(name)(torch.rand(1, 3, 5, 5)).shape == (1, 3)


def test_learned_whitening_whitens_matching_differences(rng):
    from retrieval.graph import mutual_nn_pairs
    from retrieval.knn import knn_search
    from retrieval.whitening import learn_lw_whitening

    base = rng.normal(size=(150, 10)) @ rng.normal(size=(10, 10))
    X = np.concatenate([base, base + 0.1 * rng.normal(size=base.shape) @ rng.normal(size=(10, 10))])
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # descriptors are L2-normalised; kNN is by inner product
    _, I = knn_search(X.astype(np.float32), X.astype(np.float32), 2)
    pairs = mutual_nn_pairs(I)
    assert len(pairs) > 100 and (pairs[:, 0] < pairs[:, 1]).all()
    assert np.mean(pairs[:, 1] - pairs[:, 0] == 150) > 0.9  # the planted matches are found without labels
    w = learn_lw_whitening(X, pairs)
    diff = (X[pairs[:, 0]] - X[pairs[:, 1]]) @ w.proj.T
    np.testing.assert_allclose(diff.T @ diff / len(pairs), np.eye(10), atol=1e-8)
    assert w.kind == "lw" and learn_lw_whitening(X, pairs, dim=4).apply(X).shape == (300, 4)
    with pytest.raises(ValueError, match="pairs"):
        learn_lw_whitening(X, pairs[:1])


def test_aggregate_regions_without_whitening_is_rmac_over_regions():
    from retrieval.pooling import rmac_regional
    from retrieval.whitening import aggregate_regions, learn_pca_whitening

    x = torch.rand(3, 8, 6, 9)
    v, _ = rmac_regional(x, include_global=False)
    agg = aggregate_regions([r.numpy() for r in v])
    np.testing.assert_allclose(agg, l2n(v.sum(1)).numpy(), atol=1e-5)
    w = learn_pca_whitening(np.concatenate([r.numpy() for r in v]), shrinkage=0.5)
    assert aggregate_regions([r.numpy() for r in v], w).shape == (3, w.dim)


def test_fs_map_equals_the_direct_formula():
    from retrieval.saliency import fs_map

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 5, 4, 6, generator=g))
    eps = 1e-6
    expect = torch.zeros(2, 4, 6)
    for b in range(2):
        for k in range(5):
            active = sum(float(x[b, k, i, j] > 0) for i in range(4) for j in range(6)) / 24
            wk = -np.log(eps + active)
            for i in range(4):
                for j in range(6):
                    expect[b, i, j] += wk * float(x[b, k, i, j])
    torch.testing.assert_close(fs_map(x, eps=eps), expect, atol=1e-5, rtol=1e-5)


def test_fs_egm_pools_the_salient_regions():
    from retrieval.pooling import egm_regional, fs_egm
    from retrieval.saliency import fs_map

    # channels 0-1: a sparse "object" in the top-left corner; channel 2: dense background everywhere
    x = torch.zeros(1, 3, 12, 16)
    x[0, 0, 1:4, 1:4] = 3.0
    x[0, 1, 2:4, 2:5] = 2.0
    x[0, 2] = 1.0
    x[0, 2, 8:11, 11:14] = 5.0  # a bright background patch: dense channel, FS weight ~0, not salient
    vecs, regs = egm_regional(x, fs_map(x))
    (y0, x0, h, w), = regs[0]
    assert y0 <= 1 and x0 <= 1 and y0 + h <= 6 and x0 + w <= 7  # one region, on the object
    torch.testing.assert_close(fs_egm(x)[0], l2n(torch.tensor([[3.0, 2.0, 1.0]]))[0])
    assert make_pooling("fs_egm")(x).shape == (1, 3)
    # an empty map falls back to the whole map
    z = torch.zeros(1, 3, 5, 5)
    _, regs = egm_regional(z, fs_map(z))
    assert regs == [[(0, 0, 5, 5)]]


def test_egm_pooling_weightings():
    from retrieval.pooling import egm_pooling, egm_regional
    from retrieval.saliency import fs_map

    x = torch.zeros(1, 4, 16, 16)
    x[0, 0, 2:5, 2:5] = 3.0  # strong object, channel 0
    x[0, 1, 10:12, 10:12] = 1.0  # weaker, smaller one, channel 1
    S = fs_map(x)
    vecs, regs, wts = egm_regional(x, S, weights=True)
    assert len(regs[0]) == 2 and wts[0][0] > wts[0][1] and np.isclose(wts[0].sum(), 1.0)
    torch.testing.assert_close(egm_pooling(x, S), vecs[0].sum(0)[None])
    mass = egm_pooling(x, S, weighting="mass")
    torch.testing.assert_close(mass, (torch.tensor(wts[0], dtype=torch.float32)[:, None] * vecs[0]).sum(0)[None])
    assert mass[0, 0] > mass[0, 1]  # the heavier region dominates; equal weighting does not distinguish them
    with pytest.raises(ValueError, match="unknown EGM region weighting"):
        egm_pooling(x, S, weighting="max")
    assert make_pooling("fs_egm", weighting="mass")(x).shape == (1, 4)
