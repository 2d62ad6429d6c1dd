"""Properties of the CS divergence, token-level CS, MMD and Gaussian KL against plain references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csaligner import cs_divergence, gaussian_kl, mmd, token_cs_divergence
from csaligner.losses import median_bandwidth
from tests.losses.reference import cs_loop, kernel, mmd_loop


@pytest.mark.parametrize(("m", "n", "sigma"), [(5, 5, 1.0), (4, 7, 0.7), (9, 3, 2.5), (1, 6, 1.0)])
def test_cs_matches_double_loop(m: int, n: int, sigma: float) -> None:
    x = torch.randn(m, 3, dtype=torch.float64)
    y = torch.randn(n, 3, dtype=torch.float64) + 0.5
    assert float(cs_divergence(x, y, sigma)) == pytest.approx(cs_loop(x, y, sigma), rel=1e-10, abs=1e-12)


def test_cs_of_identical_samples_is_zero() -> None:
    x = torch.randn(16, 8)
    assert float(cs_divergence(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(cs_divergence(x, x[torch.randperm(16)])) == pytest.approx(0.0, abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    shift=st.floats(0.0, 5.0),
    sigma=st.floats(0.1, 4.0),
    seed=st.integers(0, 10_000),
)
def test_cs_symmetric_and_nonnegative(m: int, n: int, shift: float, sigma: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64) + shift
    d_xy, d_yx = cs_divergence(x, y, sigma), cs_divergence(y, x, sigma)
    assert float(d_xy) == pytest.approx(float(d_yx), rel=1e-9, abs=1e-9)
    assert float(d_xy) >= -1e-9  # Cauchy-Schwarz inequality in the RKHS


def test_cs_invariant_to_shared_rotation_and_translation() -> None:
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randn(13, 5, dtype=torch.float64) * 0.7 + 1.0
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    t = torch.randn(5, dtype=torch.float64) * 10
    base = float(cs_divergence(x, y, 0.8))
    assert float(cs_divergence(x @ q + t, y @ q + t, 0.8)) == pytest.approx(base, rel=1e-9)


def test_cs_gradcheck_float64() -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cs_divergence(a, b, 0.9), (x, y))


def test_cs_finite_for_small_sigma_and_far_clouds() -> None:
    x = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(40, 16) + 3, dim=-1).requires_grad_()
    d = cs_divergence(x, y, sigma=0.05)
    d.backward()
    assert torch.isfinite(d) and d > 0
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()  # type: ignore[arg-type]
    far = cs_divergence(torch.zeros(3, 2), torch.full((3, 2), 100.0), sigma=1.0)
    assert torch.isfinite(far) and float(far) == pytest.approx(2 * 100**2 * 2 / 2, rel=1e-4)


def test_cs_bf16_inputs_and_batch_of_one() -> None:
    x = torch.randn(64, 32).bfloat16().requires_grad_()
    y = (torch.randn(48, 32) + 0.2).bfloat16().requires_grad_()
    d = cs_divergence(x, y)
    d.backward()
    assert d.dtype == torch.float32 and torch.isfinite(d)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    # One sample each: D_CS = ||a - b||^2 / sigma^2 exactly.
    assert float(cs_divergence(a, b)) == pytest.approx(float(((a - b) ** 2).sum()), rel=1e-5)


def test_cs_weights_mask_equals_subset() -> None:
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    mx = torch.tensor([True] * 6 + [False] * 4)
    my = torch.tensor([False, True] * 4)
    masked = cs_divergence(x, y, 1.3, x_weights=mx, y_weights=my)
    assert float(masked) == pytest.approx(float(cs_divergence(x[mx], y[my], 1.3)), rel=1e-10)
    # Integer weights act like repeated samples.
    w = torch.tensor([2.0, 1.0, 1.0])
    rep = torch.cat([x[:1], x[:3]])
    assert float(cs_divergence(x[:3], y, 1.0, x_weights=w)) == pytest.approx(float(cs_divergence(rep, y, 1.0)))


def test_cs_float64_weights_match_a_weighted_double_loop_and_may_require_grad() -> None:
    """Weights were rounded to float32 (a float64 D_CS 1e-9 off), and weights that require grad warned."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    wx, wy = torch.rand(6, dtype=torch.float64), torch.rand(4, dtype=torch.float64)

    def weighted_mean_kernel(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor) -> float:
        pa, pb = wa / wa.sum(), wb / wb.sum()
        return sum(float(pa[i] * pb[j]) * kernel(a[i], b[j], 0.7) for i in range(len(a)) for j in range(len(b)))

    ref = (
        math.log(weighted_mean_kernel(x, wx, x, wx))
        + math.log(weighted_mean_kernel(y, wy, y, wy))
        - 2 * math.log(weighted_mean_kernel(x, wx, y, wy))
    )
    learnable = wx.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = cs_divergence(x, y, 0.7, x_weights=learnable, y_weights=wy)
    assert float(value.detach()) == pytest.approx(ref, rel=1e-13)
    value.backward()
    assert learnable.grad is not None and torch.isfinite(learnable.grad).all()


def test_remark_3_2_cosine_of_kernel_mean_embeddings() -> None:
    """D_CS = -2 log cos(mu_x, mu_y) with mu the kernel mean embeddings, built explicitly here from
    random Fourier features phi (k(a, b) ~= phi(a) . phi(b)), independent of the log-sum-exp code."""
    sigma, d, f = 1.0, 3, 400_000
    x = torch.randn(12, d, dtype=torch.float64) * 0.6
    y = torch.randn(15, d, dtype=torch.float64) * 0.6 + 0.8
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, f, generator=g, dtype=torch.float64) / sigma
    b = torch.rand(f, generator=g, dtype=torch.float64) * 2 * math.pi

    def mean_embedding(a: torch.Tensor) -> torch.Tensor:
        return (math.sqrt(2.0 / f) * torch.cos(a @ w + b)).mean(0)

    mu_x, mu_y = mean_embedding(x), mean_embedding(y)
    cos = torch.dot(mu_x, mu_y) / (mu_x.norm() * mu_y.norm())
    assert float(-2 * torch.log(cos)) == pytest.approx(float(cs_divergence(x, y, sigma)), abs=0.02)


def test_median_bandwidth_matches_definition() -> None:
    x, y = torch.randn(7, 3), torch.randn(5, 3)
    pooled = torch.cat([x, y])
    dist = torch.cdist(pooled, pooled)
    iu = torch.triu_indices(12, 12, offset=1)
    assert float(median_bandwidth(x, y)) == pytest.approx(float(dist[iu[0], iu[1]].median()), rel=1e-5)
    assert torch.isfinite(cs_divergence(x, y, sigma="median"))


def test_median_bandwidth_checks_its_inputs() -> None:
    """It took anything: (D,) vectors were an IndexError, NaN features a NaN bandwidth, mixed widths a cat error."""
    x, y = torch.randn(7, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\)"):
        median_bandwidth(x[0], y[0])
    with pytest.raises(ValueError, match="y contains NaN or Inf in 1 of 5"):
        median_bandwidth(x, torch.cat([y[:4], torch.full((1, 3), float("nan"))]))
    with pytest.raises(ValueError, match="feature dims differ: x has D=3, y has D=2"):
        median_bandwidth(x, y[:, :2])
    with pytest.raises(ValueError, match="max_samples must be an integer >= 2"):
        median_bandwidth(x, y, max_samples=1)


def test_token_cs_matches_per_sample_loop_with_padding() -> None:
    b, v, n_txt, d = 3, 5, 6, 4
    xt = torch.randn(b, v, d, dtype=torch.float64)
    yt = torch.randn(b, n_txt, d, dtype=torch.float64) + 0.3
    xm = torch.ones(b, v, dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = token_cs_divergence(xt, yt, xm, ym, sigma=0.9, reduction="none")
    for i in range(b):
        assert float(got[i]) == pytest.approx(cs_loop(xt[i][xm[i]], yt[i][ym[i]], 0.9), rel=1e-9)
    # Padding values do not matter.
    yt2 = yt.clone()
    yt2[~ym] = 1e3
    assert torch.allclose(token_cs_divergence(xt, yt2, xm, ym, sigma=0.9), got.mean())


def test_token_cs_ignores_nan_padding_and_gives_it_zero_gradient() -> None:
    """Padding commonly holds garbage: NaN there was refused, and would have poisoned the per-sample
    centring (0 * NaN) and the matmul backward. It is ignored now, like the prior adapter ignores it."""
    g = torch.Generator().manual_seed(0)
    xt, yt = torch.randn(3, 4, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    xm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    want = token_cs_divergence(xt, yt, xm, ym, sigma=0.8, reduction="none")
    bad_x, bad_y = xt.clone(), yt.clone()
    bad_x[~xm] = float("nan")
    bad_y[~ym] = float("inf")
    bad_x.requires_grad_()
    bad_y.requires_grad_()
    got = token_cs_divergence(bad_x, bad_y, xm, ym, sigma=0.8, reduction="none")
    torch.testing.assert_close(got, want)
    got.sum().backward()
    for t, m in ((bad_x, xm), (bad_y, ym)):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[~m], torch.zeros_like(t.grad[~m])) and t.grad[m].abs().sum() > 0
    bad_x = xt.clone()
    bad_x[1, 0, 2] = float("nan")  # a real token: an error, as for pooled features
    with pytest.raises(ValueError, match=r"x_tokens contains NaN or Inf in 1 of 7 real \(unmasked\) tokens"):
        token_cs_divergence(bad_x, yt, xm, ym)


def test_mmd_matches_loop_and_kl_matches_closed_form() -> None:
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64) + 1
    assert float(mmd(x, y, 1.1)) == pytest.approx(mmd_loop(x, y, 1.1), rel=1e-9)
    px = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T) + 1e-3 * torch.eye(3, dtype=x.dtype))
    py = torch.distributions.MultivariateNormal(y.mean(0), torch.cov(y.T) + 1e-3 * torch.eye(3, dtype=y.dtype))
    expected = float(torch.distributions.kl_divergence(px, py))
    assert float(gaussian_kl(x, y)) == pytest.approx(expected, rel=1e-8)
    assert float(gaussian_kl(x, x)) == pytest.approx(0.0, abs=1e-9)


def test_kl_warns_once_when_the_ridge_dominates(monkeypatch: pytest.MonkeyPatch) -> None:
    """N <= D: the covariance is rank-deficient and the value mostly measures the ridge; say so once."""
    import warnings

    import csaligner.losses.divergence as divergence

    monkeypatch.setattr(divergence, "_WARNED_RANK_DEFICIENT", False)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # N > D: no warning
        gaussian_kl(x, y)
    wide_x, wide_y = torch.randn(8, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    with pytest.warns(
        UserWarning, match=r"8 samples in 16 dimensions \(N <= D\).*ridge \(0.001 \* I\) fills at least 9"
    ):
        gaussian_kl(wide_x, wide_y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a loss calls it every step
        gaussian_kl(wide_x, wide_y, ridge=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.full((3, 2), float("nan")), "y": torch.randn(3, 2)}, "NaN or Inf"),
        ({"x": torch.randn(3, 2), "y": torch.randn(3, 5)}, "feature dims differ"),
        ({"x": torch.randn(0, 2), "y": torch.randn(3, 2)}, "empty"),
        ({"x": torch.randn(3), "y": torch.randn(3, 2)}, r"shape \(N, D\)"),
        ({"x": torch.randn(3, 2), "y": torch.randn(3, 2), "sigma": 0.0}, "sigma must be"),
        ({"x": torch.randn(3, 2), "y": torch.randn(3, 2), "sigma": "mean"}, "median"),
        ({"x": torch.randn(3, 2), "y": torch.randn(3, 2), "x_weights": torch.zeros(3)}, "selects no sample"),
        ({"x": torch.randn(3, 2), "y": torch.randn(3, 2), "x_weights": torch.ones(4)}, r"shape \(3,\)"),
    ],
)
def test_cs_bad_input_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cs_divergence(**kwargs)


def test_token_cs_rejects_empty_sample_mask() -> None:
    xt, yt = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    ym = torch.ones(2, 5, dtype=torch.bool)
    ym[1] = False
    with pytest.raises(ValueError, match=r"no tokens \(batch indices \[1\]\)"):
        token_cs_divergence(xt, yt, y_mask=ym)
    with pytest.raises(ValueError, match="batch sizes"):
        token_cs_divergence(xt, torch.randn(3, 5, 4))


def test_token_cs_rejects_an_unknown_reduction() -> None:
    """Anything but "mean" used to return the (B,) per-sample values, e.g. reduction="sum"."""
    xt, yt = torch.randn(3, 4, 5), torch.randn(3, 6, 5)
    with pytest.raises(ValueError, match=r"reduction must be .mean. or .none..*got 'sum'"):
        token_cs_divergence(xt, yt, reduction="sum")  # type: ignore[arg-type]
