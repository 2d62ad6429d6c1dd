"""Multinomial logistic regression in torch (full-batch L-BFGS, L2 penalty), for probes (private).

Used by the few-shot linear probe and the image-vs-text separability test. Features are
standardised with the training mean and std (an affine map, so what is linearly separable does
not change) which keeps L-BFGS well conditioned on unit-norm CLIP-like features that sit in a
narrow cone. The objective is convex, so a fixed number of steps from zero is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LinearProbe:
    """A fitted softmax classifier: logits = ((x - mean) / std) @ weight + bias."""

    mean: Tensor  # (D,)
    std: Tensor  # (D,)
    weight: Tensor  # (D, C)
    bias: Tensor  # (C,)

    def predict(self, x: Tensor) -> Tensor:
        """(N, D) features -> (N,) int64 predicted classes."""
        z = (x.to(self.mean.dtype) - self.mean) / self.std
        return (z @ self.weight + self.bias).argmax(1)


def _loss_and_grad(params: Tensor, z: Tensor, onehot: Tensor, l2: float) -> tuple[float, Tensor]:
    """Mean cross-entropy + l2/2 ||W||^2 and its analytic gradient; params (D + 1, C), last row = bias."""
    log_prob = (z @ params).log_softmax(1)  # (n, C); z carries a trailing column of ones
    weight = params[:-1]
    loss = -(onehot * log_prob).sum() / z.shape[0] + 0.5 * l2 * weight.pow(2).sum()
    grad = z.T @ (log_prob.exp() - onehot) / z.shape[0]
    grad[:-1] += l2 * weight
    return float(loss), grad


def _lbfgs_direction(grad: Tensor, history: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """L-BFGS two-loop recursion: approximately -H^-1 grad from the stored (s, y, 1 / y.s) pairs."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * float((s * q).sum())
        q -= alpha * y
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        q *= float((s * y).sum() / (y * y).sum())  # initial Hessian scale gamma = s.y / y.y
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        q += (alpha - rho * float((y * q).sum())) * s
    return -q


def fit_logistic_regression(
    x: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-3, steps: int = 100, memory: int = 10
) -> LinearProbe:
    """Fit softmax regression by minimising mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised).

    A small L-BFGS with analytic gradients and Armijo backtracking: no autograd graph and no
    torch.optim (whose first use imports torch._dynamo, seconds of start-up for a tiny problem).

    Args:
        x: (N, D) training features.
        labels: (N,) int64 classes in [0, num_classes).
        num_classes: C.
        l2: weight of the L2 penalty (> 0 keeps separable few-shot problems bounded).
        steps: L-BFGS iterations at most (stops early once the gradient is below 1e-6).
        memory: curvature pairs kept.

    Returns:
        The fitted `LinearProbe` (float64).
    """
    x64 = x.detach().double()
    mean = x64.mean(0)
    std = x64.std(0, unbiased=False).clamp_min(1e-6) if x64.shape[0] > 1 else torch.ones_like(mean)
    z = torch.cat([(x64 - mean) / std, torch.ones_like(x64[:, :1])], dim=1)  # (N, D + 1) with a bias column
    onehot = F.one_hot(labels.to(z.device), num_classes).double()
    params = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, device=z.device)
    loss, grad = _loss_and_grad(params, z, onehot, l2)
    history: list[tuple[Tensor, Tensor, float]] = []
    for _ in range(steps):
        if float(grad.abs().max()) < 1e-6:
            break
        direction = _lbfgs_direction(grad, history)
        slope = float((direction * grad).sum())
        if slope >= 0:  # not a descent direction (numerics): restart from steepest descent
            history, direction, slope = [], -grad, -float((grad * grad).sum())
        step = 1.0 if history else 1.0 / max(float(grad.abs().sum()), 1.0)
        for _ in range(40):  # Armijo backtracking
            new_loss, new_grad = _loss_and_grad(params + step * direction, z, onehot, l2)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease possible at float64 precision: converged
        s_k, y_k = step * direction, new_grad - grad
        curvature = float((s_k * y_k).sum())
        if curvature > 1e-12:
            history = [*history[-(memory - 1) :], (s_k, y_k, 1.0 / curvature)]
        params, loss, grad = params + s_k, new_loss, new_grad
    return LinearProbe(mean=mean, std=std, weight=params[:-1].clone(), bias=params[-1].clone())
