"""Triton kernels against the dense references: Triton's CPU interpreter without a GPU, CUDA with one.

Small sizes and 16-wide tiles so that every code path (partial tiles, several strips, diagonal
and below-diagonal tiles of the symmetric terms, grouped ordering) runs in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.kernels.triton_setup import CUDA, DEVICE, SMALL  # first: skips without a Triton runtime

# isort: split

import triton
import triton.language as tl

from csaligner.kernels import infonce_cs_terms, resolve_impl, streamed_cs_divergence, streamed_info_nce, triton_strips
from csaligner.kernels.triton_kernels import _tile_coords
from csaligner.losses import cs_divergence, info_nce


def unit(n: int, d: int, dtype: torch.dtype = torch.float32, shift: float = 0.0) -> Tensor:
    return F.normalize(torch.randn(n, d, device=DEVICE) + shift, dim=-1).to(dtype).requires_grad_()


def check_grads(
    got: Tensor, want: Tensor, inputs: list[Tensor], rtol: float = 1e-4, per_input_scale: bool = True
) -> None:
    """Gradients agree to rtol, with atol = rtol x the largest reference gradient of each input
    (per_input_scale) or of all inputs together (the loss's gradient scale)."""
    grads = list(zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs), strict=True))
    overall = max(float(w.abs().max()) for _, w in grads)
    for g, w in grads:
        scale = float(w.abs().max()) if per_input_scale else overall
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("chunk", [16, 32])
def test_info_nce_paired_with_learnable_temperature(chunk: int) -> None:
    x, y = unit(37, 16), unit(37, 16, shift=0.1)
    temperature = torch.tensor(0.03, device=DEVICE, requires_grad=True)
    got = streamed_info_nce(x, y, temperature, backend=SMALL, chunk_size=chunk)
    want = info_nce(x, y, temperature)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    check_grads(got, want, [x, y, temperature])


def test_info_nce_multi_positive() -> None:
    x = unit(21, 16)
    t2i = torch.cat([torch.arange(21), torch.randint(0, 21, (19,))]).to(DEVICE)
    y = unit(40, 16)
    got = streamed_info_nce(x, y, 0.01, t2i, backend=SMALL, chunk_size=16)
    want = info_nce(x, y, 0.01, t2i)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    check_grads(got, want, [x, y])


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_cs_unequal_pools_and_sigma_gradient(sigma: float) -> None:
    x, y = unit(45, 16), unit(29, 16, shift=0.4)
    s = torch.tensor(sigma, device=DEVICE, requires_grad=True)
    got = streamed_cs_divergence(x, y, s, backend=SMALL, chunk_size=16)
    want = cs_divergence(x, y, s)
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    check_grads(got, want, [x, y, s], rtol=1e-3 if sigma < 0.1 else 1e-4)


def test_bfloat16_operands_close_to_dense_and_grads_in_bfloat16() -> None:
    x, y = unit(37, 16, torch.bfloat16), unit(37, 16, torch.bfloat16, shift=0.3)
    kw = {"backend": SMALL, "chunk_size": 16, "operand_dtype": torch.bfloat16}
    got = streamed_info_nce(x, y, 0.05, **kw) + 0.01 * streamed_cs_divergence(x, y, 0.5, center=False, **kw)
    want = info_nce(x, y, 0.05) + 0.01 * cs_divergence(x, y, 0.5)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-3)
    gx, gy = torch.autograd.grad(got, [x, y])
    wx, wy = torch.autograd.grad(want, [x, y])
    assert gx.dtype == torch.bfloat16
    for g, w in ((gx, wx), (gy, wy)):
        assert torch.isfinite(g.float()).all()
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2 * float(w.abs().max()))


def test_dispatch_triton_default_tiles_equals_dense() -> None:
    x, y = unit(37, 16), unit(37, 16, shift=0.2)
    got = infonce_cs_terms(x, y, temperature=0.07, sigma=1.0, impl="triton")
    want = infonce_cs_terms(x, y, temperature=0.07, sigma=1.0, impl="dense")
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-6)
    check_grads(got["infonce"] + got["cs"], want["infonce"] + want["cs"], [x, y])
    with pytest.raises(ValueError, match="multiple of the tile size"):
        infonce_cs_terms(x, y, impl="triton", chunk_size=100)


@triton.jit
def _coords_kernel(OUT, n_tm, n_tn, GROUP_M: tl.constexpr):
    tm, tn = _tile_coords(tl.program_id(0), n_tm, n_tn, GROUP_M)
    tl.store(OUT + tl.program_id(0) * 2, tm)
    tl.store(OUT + tl.program_id(0) * 2 + 1, tn)


def test_grouped_ordering_visits_every_tile_once() -> None:
    n_tm, n_tn = 5, 3  # n_tm not a multiple of GROUP_M: the last group is short
    out = torch.full((n_tm * n_tn, 2), -1, dtype=torch.int32, device=DEVICE)
    _coords_kernel[(n_tm * n_tn,)](out, n_tm, n_tn, GROUP_M=2)
    seen = sorted(map(tuple, out.tolist()))
    assert seen == [(m, n) for m in range(n_tm) for n in range(n_tn)]
    assert out[:4].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]  # column-major inside a group


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_kernels_match_dense_at_moderate_size(dtype: torch.dtype) -> None:
    x, y = unit(3000, 256, dtype), unit(3000, 256, dtype, shift=0.1)
    xa = torch.cat([x, unit(700, 256, dtype)])
    got = infonce_cs_terms(x, y, xa, y, temperature=0.02, sigma=0.5, impl="triton")
    want = infonce_cs_terms(x, y, xa, y, temperature=0.02, sigma=0.5, impl="dense")
    rtol = 1e-4 if dtype == torch.float32 else 2e-3
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=rtol, abs=rtol)
    # In bf16 the pool-only input xa gets only 0.01 x the CS gradient, a small difference of large
    # kernel-weighted sums: its error is bf16 rounding of those sums (measured on an H100: 3e-8 against
    # a max of 6e-7 for xa, with the loss's gradients up to ~1e-4), so bf16 is held to the loss's scale.
    check_grads(
        got["infonce"] + 0.01 * got["cs"],
        want["infonce"] + 0.01 * want["cs"],
        [x, y, xa],
        rtol=1e-3 if dtype == torch.float32 else 3e-2,
        per_input_scale=dtype == torch.float32,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_auto_picks_triton_and_saves_memory() -> None:
    x, y = unit(8192, 128, torch.bfloat16), unit(8192, 128, torch.bfloat16)
    assert resolve_impl("auto", x, y, x, y) == "triton"
    peaks = {}
    for impl in ("dense", "auto"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        terms = infonce_cs_terms(x, y, temperature=0.05, sigma=0.5, impl=impl, chunk_size=1024)  # type: ignore
        (terms["infonce"] + 0.01 * terms["cs"]).backward()
        peaks[impl] = torch.cuda.max_memory_allocated() - base
        x.grad = y.grad = None
    assert peaks["auto"] < peaks["dense"] / 4


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(("p", "width"), [(1, 5), (37, 70), (64, 300)])
def test_partial_sums_kernel_matches_torch(
    p: int, width: int, accumulate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sum_partials` with the Triton reduction (not yet the default): the rows of a partial buffer
    added column by column, into a fresh vector, a view of a longer one, or onto what it holds."""
    monkeypatch.setattr(triton_strips, "PARTIAL_SUMS", "triton")
    part = torch.randn(p, width, device=DEVICE)
    base = torch.randn(width + 3, device=DEVICE)
    out = base.clone()
    got = triton_strips.sum_partials(part, out[2 : 2 + width], accumulate=accumulate)
    want = part.sum(0) + (base[2 : 2 + width] if accumulate else 0.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[2 : 2 + width], want, rtol=1e-6, atol=1e-5)
    assert torch.equal(out[:2], base[:2]) and torch.equal(out[2 + width :], base[2 + width :])  # nothing else written
    torch.testing.assert_close(triton_strips.sum_partials(part), part.sum(0), rtol=1e-6, atol=1e-5)


def test_fused_loss_with_the_triton_partial_sums_matches_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every partial-sum site of the fused path (forward rows and columns, backward masses, the
    symmetric strips' masses) through the Triton reduction gives the dense loss and gradients."""
    from csaligner.kernels.fused import fused_infonce_cs
    from csaligner.losses import cs_divergence, info_nce

    monkeypatch.setattr(triton_strips, "PARTIAL_SUMS", "triton")
    x = F.normalize(torch.randn(45, 16, device=DEVICE), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(45, 16, device=DEVICE) + 0.3, dim=-1).requires_grad_()
    nce, cs = fused_infonce_cs(x, y, 0.05, 0.5, tiles=SMALL, chunk_size=32)
    w_nce, w_cs = info_nce(x, y, 0.05), cs_divergence(x, y, 0.5)
    assert float(nce) == pytest.approx(float(w_nce), rel=1e-5)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-6)
    got = torch.autograd.grad(nce + 0.3 * cs, [x, y])
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, [x, y])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "width", "split", "tma_store", "rows", "n"),
    [
        (torch.float32, 16, 1, False, 48, 45),  # a ragged last tile in the block: masked stores
        (torch.bfloat16, 16, 1, False, 64, 80),
        (torch.bfloat16, 32, 2, True, 64, 72),  # descriptor stores in column blocks, ragged end
        (torch.float32, 64, 4, True, 128, 128),
    ],
)
def test_mirrored_diagonal_block_is_the_whole_symmetric_block(
    dtype: torch.dtype, width: int, split: int, tma_store: bool, rows: int, n: int
) -> None:
    """`mirror_diagonal`: a symmetric strip's (S, S) block holds the upper tiles, their transposes
    below the diagonal and the diagonal tiles whole, the very values the unmirrored strip stores
    (halved on the diagonal); the rest of the strip, what each row's weight adds up to, the dot and
    the total are unchanged."""
    tiles = triton_strips.TritonStrips(
        block_m=width, block_n=width, block_k=16, group_m=2, num_warps=1, num_stages=1,
        epilogue_split=split, tma_store=tma_store, programs_per_sm=1, mirror_diagonal=True,
    )  # fmt: skip
    a = F.normalize(torch.randn(n, 16, device=DEVICE), dim=-1).to(dtype)
    u = -0.5 * a.float().pow(2).sum(1) / 0.25
    s = min(rows, n)
    args = (a[:s], a, u[:s], u, 1 / 0.25, 0.0, 1.0, True, True, True)
    got = tiles.kernel_grad(*args)
    plain = triton_strips.TritonStrips(**{**tiles.__dict__, "mirror_diagonal": False}).kernel_grad(*args)
    block, upper = got.w[:, :s].float(), plain.w[:, :s].float()
    diagonal = torch.zeros(s, s, dtype=torch.bool, device=DEVICE)
    for t0 in range(0, s, width):
        diagonal[t0 : t0 + width, t0 : t0 + width] = True
    # Diagonal tiles: the logits' offset differs by log 2, and so may their last bit (and, rounded to
    # bfloat16, one ulp of the weight)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(block[diagonal], 2 * upper[diagonal], rtol=ulp, atol=0)
    assert torch.equal(block[~diagonal], (upper + upper.T)[~diagonal])  # zeros below in `plain`
    assert torch.equal(got.w[:, s:], plain.w[:, s:])
    seen = got.row_mass.clone()
    seen += got.col_mass[:s]
    torch.testing.assert_close(seen, got.w.float().sum(1), rtol=1e-6, atol=0)  # what W b applies to each row
    torch.testing.assert_close(seen, plain.row_mass + plain.col_mass[:s], rtol=ulp, atol=0)
    assert torch.equal(got.col_mass[s:], plain.col_mass[s:])
    for g, p in ((got.dot, plain.dot), (got.total, plain.total)):
        torch.testing.assert_close(g, p, rtol=1e-6, atol=0)


def test_symmetric_strips_refuse_rows_that_end_inside_a_tile_and_torch_strips_can_halve_instead() -> None:
    a = F.normalize(torch.randn(45, 16, device=DEVICE), dim=-1)
    u = -0.5 * a.pow(2).sum(1)
    with pytest.raises(ValueError, match="multiple of block_m=16 unless it reaches"):
        SMALL.kernel_grad(a[:20], a, u[:20], u, 1.0, 0.0, 1.0, True, False)
    SMALL.kernel_grad(a[32:], a[32:], u[32:], u[32:], 1.0, 0.0, 1.0, True, False)  # the last strip: ragged is fine
    from csaligner.kernels.chunked import kernel_term_sums
    from csaligner.kernels.strips import TorchStrips

    halved = TorchStrips()
    halved.mirror_diagonal = False  # type: ignore[misc]
    got = [
        kernel_term_sums(b, a, a, u, u, 1.0, 0.0, 1.0, True, True, True, 16, torch.float64)
        for b in (halved, TorchStrips())
    ]
    for g, w in zip(got[0], got[1], strict=True):
        if w is not None:
            torch.testing.assert_close(g, w)
