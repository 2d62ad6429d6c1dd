"""The private L-BFGS softmax regression behind the few-shot probe and the separability test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csaligner.eval._logreg import fit_logistic_regression


@pytest.mark.parametrize("l2", [1e-1, 1e-2])
def test_reaches_the_optimum(l2: float) -> None:
    x, y = torch.randn(300, 10), torch.randint(0, 4, (300,))
    probe = fit_logistic_regression(x, y, num_classes=4, l2=l2, steps=200)
    # Autograd gradient of the same objective at the returned point must vanish (convex: optimum).
    z = ((x.double() - probe.mean) / probe.std).detach()
    w = probe.weight.clone().requires_grad_(True)
    b = probe.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
    loss.backward()
    assert w.grad is not None and b.grad is not None
    assert float(w.grad.abs().max()) < 1e-5 and float(b.grad.abs().max()) < 1e-5


def test_separates_separable_classes_and_is_deterministic() -> None:
    x = torch.cat([torch.randn(50, 6) + 4, torch.randn(50, 6) - 4])
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    a = fit_logistic_regression(x, y, num_classes=2)
    assert bool((a.predict(x) == y).all())
    assert torch.equal(a.weight, fit_logistic_regression(x, y, num_classes=2).weight)


def test_constant_feature_and_single_row() -> None:
    x = torch.randn(10, 3)
    x[:, 1] = 5.0  # zero variance: std is clamped, no NaN
    probe = fit_logistic_regression(x, torch.arange(10) % 2, num_classes=2)
    assert torch.isfinite(probe.weight).all()
    one = fit_logistic_regression(torch.randn(1, 3), torch.tensor([1]), num_classes=3)
    assert int(one.predict(torch.randn(1, 3))) == 1
