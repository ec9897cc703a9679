import numpy as np
import pytest

from retrieval.egm import egm, overlaps


def planted(shape, comps):
    """Sum of axis-aligned Gaussians a * exp(-((y-cy)^2/sy^2 + (x-cx)^2/sx^2)/2) on an (H, W) grid."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    f = np.zeros(shape)
    for a, (cy, cx), (sy, sx) in comps:
        f += a * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return f


def random_mixture(rng, shape, k, min_sep=14.0):
    comps = []
    while len(comps) < k:
        c = (rng.uniform(6, shape[0] - 6), rng.uniform(6, shape[1] - 6))
        if all(np.hypot(c[0] - o[1][0], c[1] - o[1][1]) > min_sep for o in comps):
            comps.append((rng.uniform(0.5, 1.0), c, (rng.uniform(1.5, 3.5), rng.uniform(1.5, 3.5))))
    return comps


@pytest.mark.parametrize("seed", range(12))
def test_egm_recovers_number_and_centres_of_planted_mixtures(seed):
    rng = np.random.default_rng(seed)
    k = 1 + seed % 5
    comps = random_mixture(rng, (48, 64), k)
    f = planted((48, 64), comps) + 0.02 * rng.random((48, 64))  # a little background noise
    m = egm(f)
    assert len(m) == k, (k, m.weights)
    centres = np.array([c[1] for c in comps])
    dist = np.hypot(*(m.means[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))  # (found, planted)
    assert dist.min(axis=0).max() < 1.0  # every planted centre found within a pixel
    assert sorted(dist.argmin(axis=1).tolist()) == list(range(k))  # one component per planted mode
    np.testing.assert_allclose(m.weights.sum(), 1.0)


def test_egm_merges_a_unimodal_pair_and_splits_a_bimodal_one():
    near = planted((48, 64), [(1, (24, 20), (3, 3)), (1, (24, 26), (3, 3))])  # 2 sigma apart: one mode
    far = planted((48, 64), [(1, (24, 20), (3, 3)), (1, (24, 34), (3, 3))])
    assert len(egm(near)) == 1 and len(egm(far)) == 2


def test_egm_boxes_cover_elongated_component_and_stay_in_the_map():
    f = planted((48, 64), [(1, (24, 30), (2, 6))])
    m = egm(f)
    (y0, x0, y1, x1), = m.boxes(f.shape)
    assert y0 <= 24 - 3 and y1 >= 24 + 3 and x0 <= 30 - 9 and x1 >= 30 + 9  # at least 1.5 sigma each side
    assert (x1 - x0) > 2 * (y1 - y0)  # the ellipse's elongation survives in the box
    edge = planted((10, 10), [(1, (0, 9), (2, 2))])
    b = egm(edge).boxes(edge.shape)
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 10).all() and (b[:, 3] <= 10).all() and (b[:, 2:] > b[:, :2]).all()


def test_egm_on_tiny_maps_and_degenerate_input():
    f = np.zeros((7, 7))
    f[1, 1], f[5, 5] = 1.0, 0.8
    m = egm(f)
    assert len(m) == 2 and np.allclose(sorted(m.means.tolist()), [[1, 1], [5, 5]], atol=1e-6)
    assert len(egm(np.zeros((5, 5)))) == 0
    with pytest.raises(ValueError, match="non-negative"):
        egm(-np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        egm(np.ones(4))


def test_overlap_is_the_l2_inner_product_of_weighted_gaussians():
    w = np.array([0.3, 0.7])
    mu = np.array([[10.0, 12.0], [13.0, 11.0]])
    S = np.array([[[4.0, 1.0], [1.0, 3.0]], [[2.0, -0.5], [-0.5, 5.0]]])
    yy, xx = np.mgrid[-20:45:0.25, -20:45:0.25]
    P = np.stack([yy.ravel(), xx.ravel()], 1)

    def dens(m, c):
        d = P - m
        return np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(c), d)) / (2 * np.pi * np.sqrt(np.linalg.det(c)))

    numeric = w[0] * w[1] * (dens(mu[0], S[0]) * dens(mu[1], S[1])).sum() * 0.25 ** 2
    np.testing.assert_allclose(overlaps(w, mu, S)[0, 1], numeric, rtol=1e-6)
