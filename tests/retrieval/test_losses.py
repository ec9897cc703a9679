"""Contrastive and triplet losses against closed-form values on hand-made vectors."""
import math

import pytest
import torch

from retrieval.losses import contrastive_loss, triplet_loss, tuple_contrastive_loss, tuple_loss

A = torch.tensor([[1.0, 0.0]])
P = torch.tensor([[0.8, 0.6]])  # ||A - P||^2 = 0.4
N = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]])  # ||A - N||^2 = 2.0 and 0.8


def test_contrastive_pairs_closed_form():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    t = torch.tensor([1.0, 0.0, 0.0])
    per = contrastive_loss(x, y, t, margin=0.7, reduction="none")
    # matching: ||x - y||^2 = 2; non-matching beyond the margin: 0; non-matching inside: (0.7 - sqrt(0.4))^2
    expected = torch.tensor([2.0, 0.0, (0.7 - math.sqrt(0.4)) ** 2])
    assert torch.allclose(per, expected, atol=1e-6)
    assert torch.isclose(contrastive_loss(x, y, t, margin=0.7), expected.mean())
    assert torch.isclose(contrastive_loss(x, y, t, margin=0.7, reduction="sum"), expected.sum())
    # a larger margin reaches the orthogonal pair: (2 - sqrt 2)^2
    assert math.isclose(float(contrastive_loss(x[1:2], y[1:2], t[1:2], margin=2.0)), (2 - math.sqrt(2)) ** 2, rel_tol=1e-6)


def test_tuple_contrastive_sums_positive_and_negative_pairs():
    loss = tuple_contrastive_loss(A, P, N, margin=1.0)
    # positive pair 0.4; negatives: [1 - sqrt 2]_+^2 = 0 and (1 - sqrt 0.8)^2
    assert math.isclose(float(loss), 0.4 + (1 - math.sqrt(0.8)) ** 2, rel_tol=1e-6)
    assert torch.equal(tuple_loss("contrastive", A, P, N, margin=1.0), loss)


def test_triplet_closed_form_and_batch_mean():
    # [m + 0.4 - 2.0]_+ + [m + 0.4 - 0.8]_+ with m = 0.5 -> 0 + 0.1
    assert math.isclose(float(triplet_loss(A, P, N, margin=0.5)), 0.1, rel_tol=1e-5)
    # with m = 2: [2 + 0.4 - 2.0]_+ + [2 + 0.4 - 0.8]_+ = 0.4 + 1.6
    assert math.isclose(float(triplet_loss(A, P, N, margin=2.0)), 2.0, rel_tol=1e-5)
    a2, p2, n2 = torch.cat([A, A]), torch.cat([P, A]), torch.cat([N, N])  # second tuple: positive = anchor
    per = triplet_loss(a2, p2, n2, margin=0.5, reduction="none")
    assert torch.allclose(per, torch.tensor([0.1, 0.0]), atol=1e-6)
    assert torch.isclose(triplet_loss(a2, p2, n2, margin=0.5), per.mean())


def test_gradients_finite_for_identical_vectors():
    x = torch.tensor([[0.6, 0.8]], requires_grad=True)
    y = x.detach().clone()
    loss = contrastive_loss(x, y, torch.zeros(1), margin=0.7)  # negative pair at distance 0: loss m^2
    loss.backward()
    assert math.isclose(float(loss), 0.49, rel_tol=1e-5)
    assert torch.isfinite(x.grad).all()


def test_gradient_pulls_positive_and_pushes_negative():
    a, p = A.clone().requires_grad_(True), P.clone().requires_grad_(True)
    n = N[:, 1:].clone().requires_grad_(True)  # the negative inside the margin
    triplet_loss(a, p, n, margin=0.5).backward()
    # d/dp of ||a - p||^2 = 2 (p - a): descending moves p towards a; the negative moves away from a
    assert torch.allclose(p.grad, 2 * (P - A), atol=1e-6)
    assert torch.allclose(n.grad[0], -2 * (N[0, 1:] - A), atol=1e-6)


def test_shape_and_name_errors():
    with pytest.raises(ValueError, match="negatives"):
        triplet_loss(A, P, N[0])
    with pytest.raises(ValueError, match="target"):
        contrastive_loss(A, P, torch.ones(2))
    with pytest.raises(ValueError, match="unknown loss"):
        tuple_loss("arcface", A, P, N, margin=0.1)
