"""The chunked torch path against the dense references: values, gradients, shapes of the strips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.kernels import TorchStrips, infonce_cs_terms, resolve_impl, streamed_cs_divergence, streamed_info_nce
from csaligner.kernels.chunked import one_pass_offset
from csaligner.losses import CSAlignerLoss, cs_divergence, info_nce


def unit(n: int, d: int, dtype: torch.dtype = torch.float64, shift: float = 0.0) -> Tensor:
    return F.normalize(torch.randn(n, d, dtype=dtype) + shift, dim=-1).requires_grad_()


def grads(out: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(out, inputs))


def assert_close_all(got: list[Tensor], want: list[Tensor], rtol: float, atol: float) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("temperature", [0.07, 0.01])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_info_nce_paired_matches_dense_float64(temperature: float, chunk: int) -> None:
    x, y = unit(37, 16), unit(37, 16)
    want = info_nce(x, y, temperature)
    got = streamed_info_nce(x, y, temperature, chunk_size=chunk)
    assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-12)
    assert_close_all(grads(got, [x, y]), grads(want, [x, y]), rtol=1e-9, atol=1e-12)


def test_info_nce_multi_positive_matches_dense() -> None:
    x = unit(23, 8)
    t2i = torch.cat([torch.arange(23), torch.randint(0, 23, (18,))])[torch.randperm(41)]
    y = unit(41, 8)
    want = info_nce(x, y, 0.05, t2i)
    got = streamed_info_nce(x, y, 0.05, t2i, chunk_size=5)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert_close_all(grads(got, [x, y]), grads(want, [x, y]), rtol=1e-9, atol=1e-12)


def test_info_nce_learnable_temperature_gets_dense_gradient() -> None:
    x, y = unit(30, 8), unit(30, 8)
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    want = grads(info_nce(x, y, torch.exp(-log_scale)), [x, y, log_scale])
    got = grads(streamed_info_nce(x, y, torch.exp(-log_scale), chunk_size=8), [x, y, log_scale])
    assert abs(float(want[2])) > 1e-3  # the check below could fail
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)


def test_info_nce_normalises_general_inputs_like_dense() -> None:
    x = (torch.randn(19, 6, dtype=torch.float64) * 3 + 1).requires_grad_()
    y = (torch.randn(19, 6, dtype=torch.float64) * 0.2).requires_grad_()
    want, got = info_nce(x, y, 0.1), streamed_info_nce(x, y, 0.1, chunk_size=4)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert_close_all(grads(got, [x, y]), grads(want, [x, y]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0])
@pytest.mark.parametrize(("n", "m", "chunk"), [(37, 37, 16), (45, 29, 7), (10, 53, 64), (33, 33, 1)])
def test_cs_matches_dense_float64(sigma: float, n: int, m: int, chunk: int) -> None:
    x, y = unit(n, 16), unit(m, 16, shift=0.3)
    want = cs_divergence(x, y, sigma)
    got = streamed_cs_divergence(x, y, sigma, chunk_size=chunk)
    assert float(got) == pytest.approx(float(want), rel=1e-10, abs=1e-10)
    assert_close_all(grads(got, [x, y]), grads(want, [x, y]), rtol=1e-7, atol=1e-10)


def test_cs_general_inputs_far_from_origin_and_sigma_gradient() -> None:
    x = (torch.randn(21, 5, dtype=torch.float64) + 40).requires_grad_()
    y = (torch.randn(17, 5, dtype=torch.float64) * 2 + 40.5).requires_grad_()
    sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    want = cs_divergence(x, y, sigma)
    got = streamed_cs_divergence(x, y, sigma, chunk_size=6)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert_close_all(grads(got, [x, y, sigma]), grads(want, [x, y, sigma]), rtol=1e-7, atol=1e-10)


def test_cs_of_identical_clouds_is_zero_and_gradcheck() -> None:
    x = unit(12, 4)
    assert float(streamed_cs_divergence(x, x.detach().clone(), 0.5, chunk_size=5)) == pytest.approx(0.0, abs=1e-12)
    a, b = unit(9, 3), unit(7, 3, shift=0.5)
    assert torch.autograd.gradcheck(lambda p, q: streamed_cs_divergence(p, q, 0.7, chunk_size=4), (a, b))
    assert torch.autograd.gradcheck(lambda p, q: streamed_info_nce(p, q, 0.2, chunk_size=4), (a[:7], b))


@pytest.mark.parametrize(("temperature", "sigma"), [(0.07, 1.0), (0.01, 0.05), (0.01, 0.5)])
def test_float32_terms_match_dense(temperature: float, sigma: float) -> None:
    x, y = unit(150, 32, torch.float32), unit(150, 32, torch.float32, shift=0.2)
    xa = torch.cat([x, unit(40, 32, torch.float32)])
    want = infonce_cs_terms(x, y, xa, y, temperature=temperature, sigma=sigma, impl="dense")
    got = infonce_cs_terms(x, y, xa, y, temperature=temperature, sigma=sigma, impl="chunked", chunk_size=48)
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4, abs=1e-5)
    total_w = want["infonce"] + 0.01 * want["cs"]
    total_g = got["infonce"] + 0.01 * got["cs"]
    w, g = grads(total_w, [x, y]), grads(total_g, [x, y])
    scale = max(float(t.abs().max()) for t in w)
    assert_close_all(g, w, rtol=1e-3, atol=1e-4 * scale)


def test_bfloat16_inputs_finite_close_and_grads_in_bfloat16() -> None:
    x, y = unit(64, 32, torch.bfloat16), unit(64, 32, torch.bfloat16, shift=0.2)
    got = infonce_cs_terms(x, y, temperature=0.01, sigma=0.5, impl="chunked", chunk_size=24)
    want = infonce_cs_terms(x, y, temperature=0.01, sigma=0.5, impl="dense")
    gx, gy = grads(got["infonce"] + 0.01 * got["cs"], [x, y])
    assert gx.dtype == torch.bfloat16 and gy.dtype == torch.bfloat16
    assert torch.isfinite(gx.float()).all() and torch.isfinite(gy.float()).all()
    for k in ("infonce", "cs"):
        assert got[k].dtype == torch.float32
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4)


class RecordingStrips(TorchStrips):
    """TorchStrips that records the largest strip it produced (rows x columns)."""

    def __init__(self) -> None:
        self.largest = 0

    def logits_grad(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        g, dot = super().logits_grad(*args, **kwargs)
        self.largest = max(self.largest, g.numel())
        return g, dot

    def kernel_grad(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        strip = super().kernel_grad(*args, **kwargs)
        self.largest = max(self.largest, strip.w.numel())
        return strip


def test_strips_never_hold_the_full_matrix() -> None:
    x, y = unit(200, 8, torch.float32), unit(200, 8, torch.float32)
    spy = RecordingStrips()
    loss = streamed_info_nce(x, y, 0.1, backend=spy, chunk_size=16) + streamed_cs_divergence(
        x, y, 1.0, backend=spy, chunk_size=16
    )
    loss.backward()
    assert 0 < spy.largest <= 16 * 200


def test_dispatch_auto_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    small, big = torch.randn(8, 4), torch.empty(5000, 4)
    assert resolve_impl("auto", small, small, small, small) == "dense"
    assert resolve_impl("auto", big, big, big, big) == "chunked"
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl("fast", small, small, small, small)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            infonce_cs_terms(small, small, impl="triton")
    with pytest.raises(ValueError, match="paired InfoNCE needs"):
        infonce_cs_terms(small, torch.randn(9, 4), impl="chunked")


def test_cs_aligner_loss_chunked_equals_dense() -> None:
    img, txt = torch.randn(40, 16), torch.randn(40, 16)
    extra = torch.randn(11, 16)
    out = {}
    for impl in ("dense", "chunked"):
        loss_fn = CSAlignerLoss(impl=impl, learn_temperature=True, sigma=0.5)
        terms = loss_fn(img, txt, unpaired_images=extra)
        terms["loss"].backward()
        out[impl] = (float(terms["loss"]), float(loss_fn.logit_scale.grad))
    assert out["chunked"] == pytest.approx(out["dense"], rel=1e-5)


class CountingStrips(TorchStrips):
    """TorchStrips that counts its strip calls per kind."""

    def __init__(self) -> None:
        self.calls = {"kernel_lse": 0, "kernel_grad": 0}

    def kernel_lse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls["kernel_lse"] += 1
        return super().kernel_lse(*args, **kwargs)

    def kernel_grad(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls["kernel_grad"] += 1
        return super().kernel_grad(*args, **kwargs)


def test_kernel_terms_take_one_pass_when_features_need_gradients() -> None:
    """With gradients wanted, each kernel term builds its strips once (in forward); backward only rescales."""
    x, y = unit(40, 8), unit(30, 8, shift=0.3)
    spy = CountingStrips()
    loss = streamed_cs_divergence(x, y, 0.5, backend=spy, chunk_size=16)
    assert spy.calls == {"kernel_lse": 0, "kernel_grad": 3 + 2 + 3}  # XX: 3 strips, YY: 2, XY: 3
    got = grads(loss, [x, y])
    assert spy.calls["kernel_grad"] == 8 and spy.calls["kernel_lse"] == 0
    assert_close_all(got, grads(cs_divergence(x, y, 0.5), [x, y]), rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # no gradients: log-sum-exps only, and the same value
        spy.calls = {"kernel_lse": 0, "kernel_grad": 0}
        assert float(streamed_cs_divergence(x, y, 0.5, backend=spy, chunk_size=16)) == pytest.approx(
            float(loss), rel=1e-12
        )
        assert spy.calls == {"kernel_lse": 8, "kernel_grad": 0}


def test_cross_term_without_a_known_offset_keeps_two_passes() -> None:
    """Far-apart clouds and a small sigma: the a-vs-b logits span > 80 nats, so that term takes
    log-sum-exps first and recomputes in backward; values and gradients still match dense."""
    x, y = unit(20, 4), unit(20, 4, shift=3.0)
    x = (x.detach() * 3.0).requires_grad_()
    spy = CountingStrips()
    loss = streamed_cs_divergence(x, y, 0.2, backend=spy, chunk_size=8, center=False)
    assert spy.calls == {"kernel_lse": 3, "kernel_grad": 3 + 3}
    want = cs_divergence(x, y, 0.2)
    assert float(loss) == pytest.approx(float(want), rel=1e-9)
    assert_close_all(grads(loss, [x, y]), grads(want, [x, y]), rtol=1e-7, atol=1e-10)
    assert spy.calls["kernel_grad"] == 9


def test_one_pass_offset_bounds() -> None:
    u = torch.tensor([-0.5, -0.1], dtype=torch.float64)
    assert one_pass_offset(u, u, symmetric=True) == 0.0
    assert one_pass_offset(u, u, symmetric=False) == pytest.approx(-1.0)  # logits in [-2, 0]
    assert one_pass_offset(u * 100, u, symmetric=False) is None  # [-101, 0] spans > 80 nats


def test_retained_graph_backward_twice_gives_the_same_bits() -> None:
    x, y = unit(30, 8), unit(25, 8, shift=0.2)
    sigma = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    loss = streamed_cs_divergence(x, y, sigma, chunk_size=8)
    first = torch.autograd.grad(loss, [x, y, sigma], retain_graph=True)
    second = torch.autograd.grad(loss, [x, y, sigma])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_does_not_lower_the_strips_precision(dtype: torch.dtype) -> None:
    """Under autocast the strips still compute in float32: with the cross term's one-pass offset
    (-1/sigma^2 for unit vectors) float16 weights would overflow (cs = -inf, NaN gradients)."""
    x, y = unit(64, 16, torch.float32), unit(64, 16, torch.float32, shift=0.3)
    with torch.autocast("cpu", dtype=dtype):
        got = infonce_cs_terms(x, y, temperature=0.1, sigma=0.2, impl="chunked", chunk_size=16)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want = infonce_cs_terms(x64, y64, temperature=0.1, sigma=0.2, impl="dense")
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5)
    g, w = grads(got["cs"], [x]), grads(want["cs"], [x64])
    torch.testing.assert_close(g[0].double(), w[0], rtol=1e-4, atol=1e-4 * float(w[0].abs().max()))


@pytest.mark.parametrize("several", [False, True])
@pytest.mark.parametrize(("temperature", "noise"), [(0.05, 0.02), (0.01, 0.3), (0.01, 0.02)])
def test_float32_loss_value_near_zero_is_as_precise_as_dense(several: bool, temperature: float, noise: float) -> None:
    """Log-sum-exps kept as (max, small log-sum) across strips and the positives' logits taken from
    the strips: a loss near 0 is ~1e-7 off float64, as dense float32 (it read 7.6e-6 at a loss of 0
    and 2.8e-7 at 1.3e-5 when the rounded log-sum-exps and a separate dot were subtracted)."""
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(300, 64, generator=g), dim=-1)
    y = F.normalize(x + noise * torch.randn(300, 64, generator=g), dim=-1)
    t2i = None
    if several:  # a second caption for the first 40 images, which then cannot reach a zero loss
        y = torch.cat([y, F.normalize(x[:40] + noise * torch.randn(40, 64, generator=g), dim=-1)])
        t2i = torch.cat([torch.arange(300), torch.arange(40)])
    got = float(streamed_info_nce(x, y, temperature, t2i, chunk_size=64))
    want = float(info_nce(x.double(), y.double(), temperature, t2i))
    dense32 = float(info_nce(x, y, temperature, t2i))
    assert abs(got - want) <= max(2.0 * abs(dense32 - want), 1e-7 * max(1.0, want))


class _LseOnly:
    """A strip backend written before `logits_lse_split`: everything else from TorchStrips."""

    def __init__(self) -> None:
        self._t = TorchStrips()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name == "logits_lse_split":
            raise AttributeError(name)
        return getattr(self._t, name)


def test_a_backend_without_the_split_log_sum_exps_still_works() -> None:
    x, y = unit(37, 16), unit(37, 16)
    want = info_nce(x, y, 0.07)
    got = streamed_info_nce(x, y, 0.07, backend=_LseOnly(), chunk_size=8)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert_close_all(grads(got, [x, y]), grads(want, [x, y]), rtol=1e-9, atol=1e-12)


def test_bfloat16_operands_with_a_learnable_temperature() -> None:
    """sum(G * l) of bf16 logits against float32 G (torch.dot refused the mixed dtypes)."""
    x, y = unit(40, 16, torch.float32), unit(40, 16, torch.float32)
    t = torch.tensor(0.07, requires_grad=True)
    got = streamed_info_nce(x, y, t, chunk_size=16, operand_dtype=torch.bfloat16)
    (gt,) = torch.autograd.grad(got, [t])
    t64 = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    (wt,) = torch.autograd.grad(info_nce(x.double(), y.double(), t64), [t64])
    assert float(gt) == pytest.approx(float(wt), rel=2e-2)


@pytest.mark.parametrize("chunk", [0, -1, -16, 2.5])
def test_a_chunk_size_that_is_not_a_positive_integer_is_an_error(chunk: float) -> None:
    """range() with a negative step visits no strip: the terms came back -inf and NaN."""
    x, y = torch.randn(10, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive integer.*got {chunk}"):
        infonce_cs_terms(x, y, impl="chunked", chunk_size=chunk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        streamed_info_nce(x, y, 0.07, chunk_size=chunk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        streamed_cs_divergence(x, y, 1.0, chunk_size=chunk)  # type: ignore[arg-type]


def test_a_numpy_integer_chunk_size_is_accepted() -> None:
    """A chunk size computed with numpy (np.int64) is a positive integer too; it worked before the check."""
    x, y = torch.randn(40, 4), torch.randn(40, 4)
    want = infonce_cs_terms(x, y, impl="chunked", chunk_size=16)
    got = infonce_cs_terms(x, y, impl="chunked", chunk_size=np.int64(16))  # type: ignore[arg-type]
    assert all(float(got[k]) == pytest.approx(float(want[k]), rel=1e-6) for k in want)
    assert float(streamed_info_nce(x, y, 0.07, chunk_size=np.int32(16))) == pytest.approx(
        float(streamed_info_nce(x, y, 0.07, chunk_size=16)), rel=1e-6
    )


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_pools_without_the_cs_term_are_an_error(impl: str) -> None:
    """with_cs=False computes InfoNCE alone: unpaired pools passed with it used to vanish unseen."""
    x, y = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    pool = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="with_cs=False computes InfoNCE alone"):
        infonce_cs_terms(x, y, torch.cat([x, pool]), with_cs=False, impl=impl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drop the pools or pass with_cs=True"):
        infonce_cs_terms(x, y, y_all=torch.cat([y, pool]), with_cs=False, impl=impl)  # type: ignore[arg-type]
    assert set(infonce_cs_terms(x, y, with_cs=False, impl=impl)) == {"infonce"}  # type: ignore[arg-type]


@pytest.mark.parametrize("arg", ["x", "y", "x_all", "y_all", "text_to_image"])
def test_a_list_or_array_argument_is_a_type_error_naming_the_conversion(arg: str) -> None:
    """A list x or y used to raise AttributeError ('list' object has no attribute 'dtype') in dispatch."""
    x, y = F.normalize(torch.randn(4, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    kwargs: dict[str, object] = {"x": x, "y": y, "text_to_image": torch.arange(4)}
    kwargs[arg] = (kwargs.get(arg, x)).tolist()  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=rf"{arg} must be a torch.Tensor.*torch.as_tensor\({arg}\)"):
        infonce_cs_terms(**kwargs)  # type: ignore[arg-type]
