"""The fused InfoNCE + D_CS Triton path against the dense references (interpreter on CPU, CUDA with one).

Small sizes and 16-wide tiles: partial tiles, several strips, both exp modes (temperature above
and below 1 / MAX_ONE_EXP_SCALE), several captions per image, features that are not unit norm.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.kernels.triton_setup import CUDA, DEVICE, SMALL  # first: skips without a Triton runtime

# isort: split

from csaligner import _validation
from csaligner._validation import NonFiniteFeaturesError
from csaligner.kernels import fused, fused_kernels, infonce_cs_terms, streamed_cs_divergence, streamed_info_nce
from csaligner.kernels.fused import MAX_ONE_EXP_SCALE, fused_infonce_cs
from csaligner.kernels.fused_kernels import (
    BACKWARD_PAIR_TILES,
    BACKWARD_PAIR_TILES_FLOAT32,
    FORWARD_PAIR_TILES,
    SYMMETRIC_TILES,
    SYMMETRIC_TILES_FLOAT32,
    backward_pair_tiles,
    symmetric_tiles,
)
from csaligner.kernels.strips import HostRead, mm_accumulate
from csaligner.kernels.triton_strips import TritonStrips, _multiprocessors
from csaligner.losses import CSAlignerLoss, cs_divergence, info_nce


def feats(n: int, d: int, dtype: torch.dtype = torch.float32, shift: float = 0.0, spread: float = 1.0) -> Tensor:
    return F.normalize(spread * torch.randn(n, d, device=DEVICE) + shift, dim=-1).to(dtype).requires_grad_()


def dense_pair(x: Tensor, y: Tensor, temperature: Tensor | float, sigma: Tensor | float, t2i: Tensor | None = None):
    return info_nce(x, y, temperature, t2i), cs_divergence(x, y, sigma)


def assert_grads_close(got: list[Tensor], want: list[Tensor], rtol: float) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=rtol * float(w.abs().max()))


# (0.07, 0.4): one exp per logit, kernel tiles without a max; (0.01, 0.1): scale > 40 and kernel
# logits down to -200, the max-offset branches of both.
@pytest.mark.parametrize(("temperature", "sigma"), [(0.07, 0.4), (0.01, 0.1)])
@pytest.mark.parametrize("chunk", [16, 48])
def test_fused_matches_dense_values_and_all_gradients(temperature: float, sigma: float, chunk: int) -> None:
    assert (MAX_ONE_EXP_SCALE >= 1 / 0.07) and (MAX_ONE_EXP_SCALE < 1 / 0.01)
    x, y = feats(45, 16), feats(45, 16, shift=0.3)
    t = torch.tensor(temperature, device=DEVICE, requires_grad=True)
    s = torch.tensor(sigma, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(x, y, t, s, tiles=SMALL, chunk_size=chunk)
    w_nce, w_cs = dense_pair(x, y, t, s)
    assert float(nce) == pytest.approx(float(w_nce), rel=1e-5)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-5)
    inputs = [x, y, t, s]
    got = torch.autograd.grad(nce + 0.3 * cs, inputs)
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, inputs)
    assert_grads_close(list(got), list(want), rtol=1e-4)


def test_fused_several_captions_per_image_and_raw_norms() -> None:
    """InfoNCE normalises, D_CS sees the raw features: the normalisation's Jacobian is in-kernel."""
    x = (feats(21, 16) * torch.linspace(0.5, 2.0, 21, device=DEVICE)[:, None]).detach().requires_grad_()
    t2i = torch.cat([torch.arange(21), torch.randint(0, 21, (19,))]).to(DEVICE)
    y = feats(40, 16, shift=0.2)
    nce, cs = fused_infonce_cs(x, y, 0.05, 1.0, t2i, tiles=SMALL, chunk_size=16)
    w_nce, w_cs = dense_pair(x, y, 0.05, 1.0, t2i)
    # Values against float64: here the float32 dense reference is itself off by up to 1.4e-6 in
    # D_CS (on an H100, 20 seeds: fused 1.37e-6, dense 1.36e-6), so fused vs float32 dense failed
    # by a hair on CUDA with the two summation orders.
    nce64, cs64 = dense_pair(x.double(), y.double(), 0.05, 1.0, t2i)
    assert float(nce) == pytest.approx(float(nce64), rel=1e-5, abs=3e-6)
    assert float(cs) == pytest.approx(float(cs64), rel=1e-5, abs=3e-6)
    for a, b in ((nce, w_nce), (cs, w_cs)):  # each term's gradient on its own
        assert_grads_close(
            list(torch.autograd.grad(a, [x, y], retain_graph=True)),
            list(torch.autograd.grad(b, [x, y], retain_graph=True)),
            1e-4,
        )


def test_bfloat16_cs_gradient_of_a_tight_cone_is_not_lost_to_rounding() -> None:
    """All features near one direction: sum_j W_ij (y_j - x_i) is a small difference of sums of
    bf16 weights. Row sums of the *stored* weights make it cancel; the CS gradient alone must then
    match the float64 reference on the same bf16 values to bf16 accuracy."""
    x, y = feats(40, 16, torch.bfloat16, shift=3.0, spread=0.3), feats(40, 16, torch.bfloat16, shift=3.0, spread=0.3)
    _, cs = fused_infonce_cs(x, y, 0.07, 0.5, tiles=SMALL, chunk_size=16)
    gx, gy = torch.autograd.grad(cs, [x, y])
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    wx, wy = torch.autograd.grad(cs_divergence(x64, y64, 0.5), [x64, y64])
    assert gx.dtype == torch.bfloat16
    assert_grads_close([gx, gy], [wx, wy], rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_symmetric_terms_equal_the_no_grad_values_and_backward_twice(dtype: torch.dtype) -> None:
    """With gradients wanted, X X^T and Y Y^T are built in the forward pass (offset 0, the diagonal);
    without, they take log-sum-exps. Same values (the forward sums the unrounded weights), and a
    retained graph's second backward recomputes the strips to the same bits."""
    x, y = feats(38, 16, dtype), feats(45, 16, dtype, shift=0.3)
    t2i = torch.arange(45, device=DEVICE) % 38
    sigma = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        lazy = fused_infonce_cs(x, y, 0.07, sigma, t2i, tiles=SMALL, chunk_size=16)
    nce, cs = fused_infonce_cs(x, y, 0.07, sigma, t2i, tiles=SMALL, chunk_size=16)
    assert float(nce) == float(lazy[0])
    assert float(cs) == pytest.approx(float(lazy[1]), rel=1e-6, abs=1e-6)
    first = torch.autograd.grad(nce + 0.5 * cs, [x, y, sigma], retain_graph=True)
    second = torch.autograd.grad(nce + 0.5 * cs, [x, y, sigma])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_dispatch_uses_fused_only_when_pools_are_the_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = fused.fused_infonce_cs

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "fused_infonce_cs", spy)
    x, y = feats(37, 16, torch.bfloat16), feats(37, 16, torch.bfloat16, shift=0.2)
    got = infonce_cs_terms(x, y, temperature=0.07, sigma=1.0, impl="triton")
    want = infonce_cs_terms(x, y, temperature=0.07, sigma=1.0, impl="dense")
    assert calls == [1]
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4, abs=1e-5)
    xa = torch.cat([x, feats(5, 16, torch.bfloat16)])
    infonce_cs_terms(x, y, xa, y, impl="triton")  # unpaired images: the separate strip path
    x32, y32 = x.detach().float(), y.detach().float()
    infonce_cs_terms(x32, y32, impl="triton")  # float32: the separate strips (fused fp32 measured slower)
    assert calls == [1]


def test_pair_kernels_take_rectangular_tiles_symmetric_ones_refuse_them() -> None:
    x, y = feats(45, 16), feats(38, 16, shift=0.2)
    wide = TritonStrips(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=1, num_stages=1)
    nce, cs = fused_infonce_cs(x[:38], y, 0.05, 0.5, tiles=SMALL, pair_tiles=wide, chunk_size=32)
    w_nce, w_cs = dense_pair(x[:38], y, 0.05, 0.5)
    assert float(nce) == pytest.approx(float(w_nce), rel=1e-5)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-6)
    assert_grads_close(list(torch.autograd.grad(nce + cs, [y])), list(torch.autograd.grad(w_nce + w_cs, [y])), 1e-4)
    with pytest.raises(ValueError, match="square tiles"):
        fused_infonce_cs(x, x, 0.05, 0.5, tiles=wide, chunk_size=32)


def test_fused_rejects_bad_chunk_and_float64() -> None:
    x, y = feats(20, 16), feats(20, 16)
    with pytest.raises(ValueError, match="multiple of the tile size 16"):
        fused_infonce_cs(x, y, 0.07, 1.0, tiles=SMALL, chunk_size=24)
    with pytest.raises(ValueError, match="float64"):
        fused_infonce_cs(x.double(), y.double(), 0.07, 1.0, tiles=SMALL, chunk_size=16)


def test_fused_reads_its_checks_with_the_forward_scalars() -> None:
    """The finite-feature and positive-scalar tests run in the forward pass's one host read: the
    same errors as check_features / check_positive, naming the argument."""
    x, y = feats(20, 16), feats(20, 16)
    bad = x.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="x contains NaN or Inf in 1 of 20"):
        fused_infonce_cs(bad, y, 0.07, 1.0, tiles=SMALL, chunk_size=16)
    with pytest.raises(NonFiniteFeaturesError, match="y contains NaN or Inf in 1 of 20"):
        fused_infonce_cs(x, bad, 0.07, 1.0, tiles=SMALL, chunk_size=16)
    for value in (0.0, -0.07, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fused_infonce_cs(x, y, torch.tensor(value, device=DEVICE), 1.0, tiles=SMALL, chunk_size=16)
        with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
            fused_infonce_cs(x, y, 0.07, torch.tensor(value, device=DEVICE), tiles=SMALL, chunk_size=16)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        fused_infonce_cs(x, y, 0.07, -1.0, tiles=SMALL, chunk_size=16)  # a float: refused before any work
    # quoted as passed (as the dense path does), not as 1 / (1 / T) after a float32 round trip
    t = torch.tensor([-0.07], dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape(f"temperature must be a finite number > 0, got {t!r}")):
        fused_infonce_cs(x, y, t, 1.0, tiles=SMALL, chunk_size=16)
    with pytest.raises(ValueError, match=re.escape(f"temperature must be a finite number > 0, got {t!r}")):
        info_nce(x, y, t)
    with pytest.raises(ValueError, match="single number"):
        fused_infonce_cs(x, y, torch.ones(2, device=DEVICE), 1.0, tiles=SMALL, chunk_size=16)


def test_the_loss_module_tests_its_inputs_only_in_the_fused_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """CSAlignerLoss on the fused route makes no value test of its own (each would be a GPU sync):
    its image and text are tested through their unit copies in the fused forward's host read, and
    a bad one is still reported under its own name with its row count."""
    tested: list[str] = []
    real = _validation._test_finite
    monkeypatch.setattr(_validation, "_test_finite", lambda name, t: (tested.append(name), real(name, t)))
    x, y = feats(40, 16, torch.bfloat16), feats(40, 16, torch.bfloat16, shift=0.3)
    loss = CSAlignerLoss(lam=0.1, sigma=0.5, impl="triton")
    out = loss(x, y)
    out["loss"].backward()
    assert tested == []
    want = CSAlignerLoss(lam=0.1, sigma=0.5, impl="chunked")(x, y)
    assert float(out["loss"]) == pytest.approx(float(want["loss"]), rel=1e-3)
    assert tested == ["image", "text"]  # the chunked route tests them itself
    tested.clear()
    for name in ("image", "text"):
        a, b = x.detach().clone(), y.detach().clone()
        (a if name == "image" else b)[[1, 30], 2] = float("nan")
        with pytest.raises(NonFiniteFeaturesError, match=f"{name} contains NaN or Inf in 2 of 40"):
            loss(a, b)
    assert tested == []
    a = x.detach().clone()
    a[0, 0] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="image contains NaN"):  # before the kernels' own error
        loss(a, y[:, :8])


def test_float_and_tensor_scalars_give_the_same_terms_and_gradients() -> None:
    """Python numbers stay on the host (the symmetric strips are queued before the host read); tensors
    are read. Both give the dense values; with the same float32 numbers, the same floats."""
    x, y = feats(40, 16), feats(40, 16, shift=0.3)
    t, sigma = 0.0625, 0.5  # exact in float32: both paths see the same numbers
    by_float = fused_infonce_cs(x, y, t, sigma, tiles=SMALL, chunk_size=16)
    t_tensor = torch.tensor(t, device=DEVICE)
    by_tensor = fused_infonce_cs(x, y, t_tensor, torch.tensor(sigma, device=DEVICE), tiles=SMALL, chunk_size=16)
    for a, b in zip(by_float, by_tensor, strict=True):
        assert float(a.detach()) == float(b.detach())
    got = torch.autograd.grad(by_float[0] + 0.3 * by_float[1], [x, y])
    want = torch.autograd.grad(by_tensor[0] + 0.3 * by_tensor[1], [x, y])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_host_read_holds_the_values_as_queued() -> None:
    t = torch.tensor([1.5, -2.0, 3.25], device=DEVICE)
    pending = HostRead(t)
    t.add_(100.0)  # queued after the read: not seen by it
    assert pending.values() == [1.5, -2.0, 3.25]
    assert HostRead(torch.tensor(7.0, device=DEVICE)).values() == [7.0]  # 0-dim: one value


def test_mm_accumulate_keeps_float32_precision_for_half_operands() -> None:
    a = torch.randn(8, 300, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(300, 4, device=DEVICE).to(torch.bfloat16)
    acc = torch.full((8, 4), 1000.0, device=DEVICE)
    mm_accumulate(acc, a, b)
    want = 1000.0 + a.double() @ b.double()
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=1e-3)  # a bf16 product would be off by ~4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_fused_matches_dense_at_moderate_size(dtype: torch.dtype) -> None:
    x, y = feats(3000, 256, dtype), feats(3000, 256, dtype, shift=0.1)
    got = infonce_cs_terms(x, y, temperature=0.02, sigma=0.5, impl="triton", chunk_size=1024)
    want = infonce_cs_terms(x, y, temperature=0.02, sigma=0.5, impl="dense")
    rtol = 1e-4 if dtype == torch.float32 else 2e-3
    for k in ("infonce", "cs"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=rtol, abs=rtol)
    got_g = torch.autograd.grad(got["infonce"] + 0.01 * got["cs"], [x, y])
    want_g = torch.autograd.grad(want["infonce"] + 0.01 * want["cs"], [x, y])
    assert_grads_close(list(got_g), list(want_g), rtol=1e-3 if dtype == torch.float32 else 3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("split", [1, 2, 4])
def test_gpu_split_epilogue_tiles_match_the_unsplit_tiles(split: int) -> None:
    """The full-size backward tiles with the epilogue on column blocks (the half-operand default,
    `BACKWARD_PAIR_TILES`, has 4) give the unsplit 8-warp tiles' loss and gradients."""
    x, y = feats(3000, 256, torch.bfloat16), feats(3000, 256, torch.bfloat16, shift=0.1)
    split_tiles = TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2, tma_store=True, epilogue_split=split)
    results = []
    for pair in (BACKWARD_PAIR_TILES_FLOAT32, split_tiles, None):
        nce, cs = fused_infonce_cs(x, y, 0.02, 0.5, pair_tiles=pair, forward_tiles=FORWARD_PAIR_TILES, chunk_size=1024)
        results.append((nce, cs, *torch.autograd.grad(nce + 0.01 * cs, [x, y])))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_mirrored_symmetric_tiles_match_the_default() -> None:
    """The compiled X X^T / Y Y^T kernels with the diagonal block mirrored (descriptor stores in 4
    column blocks, as `SYMMETRIC_TILES`) give the default's loss and gradients."""
    x, y = feats(3000, 256, torch.bfloat16), feats(3000, 256, torch.bfloat16, shift=0.1)
    mirrored = replace(SYMMETRIC_TILES, mirror_diagonal=True)
    results = []
    for tiles in (SYMMETRIC_TILES, mirrored):
        nce, cs = fused_infonce_cs(x, y, 0.02, 0.5, tiles=tiles, chunk_size=1024)
        results.append((nce, cs, *torch.autograd.grad(nce + 0.01 * cs, [x, y])))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-6)


def test_default_tiles_by_dtype() -> None:
    """Half operands take the split-epilogue tiles; float32 ones (CUDA-core dots, whose compile with
    those tiles spills) keep the tiles of before."""
    for half in (torch.bfloat16, torch.float16):
        assert backward_pair_tiles(half) is BACKWARD_PAIR_TILES
        assert symmetric_tiles(half) is SYMMETRIC_TILES
    assert backward_pair_tiles(torch.float32) is BACKWARD_PAIR_TILES_FLOAT32
    assert symmetric_tiles(torch.float32) is SYMMETRIC_TILES_FLOAT32
    assert BACKWARD_PAIR_TILES.epilogue_split == SYMMETRIC_TILES.epilogue_split == 4
    assert BACKWARD_PAIR_TILES_FLOAT32.epilogue_split == SYMMETRIC_TILES_FLOAT32.epilogue_split == 1


@pytest.mark.parametrize(
    ("dx", "dy", "want"),
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.float32),
    ],
)
def test_fused_default_tiles_follow_the_operand_dtype(
    dx: torch.dtype, dy: torch.dtype, want: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without tiles given, `fused_infonce_cs` asks for the defaults of the dtype it computes in
    (float32 when x and y differ); the answers are shrunk to test size here."""
    asked: list[torch.dtype] = []
    for name in ("symmetric_tiles", "backward_pair_tiles"):
        real = getattr(fused, name)

        def small(d: torch.dtype, real=real) -> TritonStrips:  # type: ignore[no-untyped-def]
            asked.append(d)
            return replace(real(d), block_m=16, block_n=16, block_k=16, epilogue_split=1)

        monkeypatch.setattr(fused, name, small)
    x, y = feats(40, 16).to(dx), feats(40, 16, shift=0.3).to(dy)
    fused_infonce_cs(x, y, 0.05, 0.5, forward_tiles=SMALL, chunk_size=16)
    assert asked == [want, want]


# Operand loading (tensor descriptors or pointers) and grid (a program per tile, or a persistent
# grid of a few programs looping over tiles) must not change a bit of the result's meaning.
VARIANTS = [
    replace(SMALL, tma=False, programs_per_sm=0),
    replace(SMALL, tma=True, programs_per_sm=0),
    replace(SMALL, tma=True, programs_per_sm=1),
    replace(SMALL, tma=False, programs_per_sm=1),
    # The symmetric strips' diagonal block whole (`mirror_diagonal`, off by default).
    replace(SMALL, tma=True, programs_per_sm=1, mirror_diagonal=True),
    replace(SMALL, tma=False, programs_per_sm=0, mirror_diagonal=True),
]


def _variant_id(t: TritonStrips) -> str:
    mirror = "-mirror" if t.mirror_diagonal else ""
    return f"tma{int(t.tma)}-pps{t.programs_per_sm}{mirror}"


@pytest.mark.parametrize("tiles", VARIANTS, ids=_variant_id)
def test_loading_and_grid_variants_match_dense(tiles: TritonStrips) -> None:
    x, y = feats(45, 16), feats(38, 16, shift=0.3)
    # 31 images, 38 texts: every image has a caption, 7 images have a second one (off the diagonal).
    t2i = torch.cat([torch.arange(31), torch.randint(0, 31, (7,))]).to(DEVICE)
    s = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(x[:31], y, 0.05, s, t2i, tiles=tiles, chunk_size=32)
    w_nce, w_cs = dense_pair(x[:31], y, 0.05, s, t2i)
    assert float(nce) == pytest.approx(float(w_nce), rel=1e-5)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-6)
    inputs = [x, y, s]
    got = torch.autograd.grad(nce + 0.3 * cs, inputs)
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, inputs)
    assert_grads_close(list(got), list(want), rtol=1e-4)
    # The separate strips (unequal pools, InfoNCE alone) through the same variant.
    xa = torch.cat([x, feats(9, 16)])
    got_s = streamed_cs_divergence(xa, y, s, backend=tiles, chunk_size=16) + streamed_info_nce(
        x[:31], y, 0.05, t2i, backend=tiles, chunk_size=16
    )
    want_s = cs_divergence(xa, y, s) + info_nce(x[:31], y, 0.05, t2i)
    assert float(got_s) == pytest.approx(float(want_s), rel=1e-5)
    assert_grads_close(list(torch.autograd.grad(got_s, inputs)), list(torch.autograd.grad(want_s, inputs)), rtol=1e-4)


def test_persistent_grid_has_fewer_programs_than_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The persistent variants really loop: record the grids that `_launch` takes from `_grid`."""
    grids: list[tuple[int, int, bool, bool]] = []
    original = TritonStrips._grid

    def spy(self: TritonStrips, n_tiles: int, a: Tensor, b: Tensor) -> tuple[int, bool, bool]:
        out = original(self, n_tiles, a, b)
        grids.append((n_tiles, *out))
        return out

    monkeypatch.setattr(TritonStrips, "_grid", spy)
    dtype = torch.bfloat16 if CUDA else torch.float32  # on CUDA float32 keeps a program per tile
    x, y = feats(45, 16, dtype), feats(45, 16, dtype, shift=0.3)
    sms = _multiprocessors(x.device)
    has_tma = not CUDA or torch.cuda.get_device_capability()[0] >= 9
    for tiles in VARIANTS:
        grids.clear()
        nce, cs = fused_infonce_cs(x, y, 0.05, 0.4, tiles=tiles, chunk_size=48)
        (nce + cs).backward()
        assert grids
        for n_tiles, programs, tma, persistent in grids:
            assert tma == (tiles.tma and has_tma)
            assert persistent == (tiles.programs_per_sm > 0)
            assert programs == (min(n_tiles, tiles.programs_per_sm * sms) if persistent else n_tiles)
        if tiles.programs_per_sm and not CUDA:
            assert max(n for n, *_ in grids) > tiles.programs_per_sm * sms  # more tiles than programs: it loops
    if CUDA:  # float32 operands: pointer loads, a program per tile, whatever the settings
        grids.clear()
        fused_infonce_cs(x.float(), y.float(), 0.05, 0.4, tiles=VARIANTS[2], chunk_size=48)
        assert grids and all(not tma and not persistent and p == n for n, p, tma, persistent in grids)


def test_tile_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="programs_per_sm"):
        replace(SMALL, programs_per_sm=-1)
    with pytest.raises(ValueError, match="num_stages"):
        replace(SMALL, num_stages=0)
    with pytest.raises(ValueError, match="epilogue_split must be 1, 2 or 4"):
        replace(SMALL, block_n=64, epilogue_split=3)
    with pytest.raises(ValueError, match=r"block_n / epilogue_split >= 16, got 2 \(block_n=16\)"):
        replace(SMALL, epilogue_split=2)


def test_symmetric_strips_must_start_on_tile_rows() -> None:
    """A strip boundary inside a tile would halve pairs whose mirror tile is never visited."""
    x, y = feats(45, 16), feats(38, 16, shift=0.3)
    with pytest.raises(ValueError, match="multiple of the backend's tile rows"):
        streamed_cs_divergence(x, y, 0.5, backend=SMALL, chunk_size=24)
    got = streamed_cs_divergence(x, y, 0.5, backend=SMALL)  # default strips: rounded to tile rows
    assert float(got) == pytest.approx(float(cs_divergence(x, y, 0.5)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", [48, 44])
def test_tma_stores_and_a_tile_setting_per_kernel_match_dense(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight strips written through tensor descriptors (tile-aligned and ragged sizes: the copy
    engine clips the edge tiles), with different tiles for the symmetric, forward and backward kernels."""
    stores: list[bool] = []
    real = TritonStrips._out_operand

    def spy(self: TritonStrips, out: Tensor, a: Tensor, b: Tensor, block_n: int | None = None) -> tuple[object, bool]:
        arg, tma = real(self, out, a, b, block_n)
        stores.append(tma)
        return arg, tma

    monkeypatch.setattr(TritonStrips, "_out_operand", spy)
    x, y = feats(n, 16), feats(n, 16, shift=0.3)
    s = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(
        x, y, 0.05, s,
        tiles=replace(SMALL, tma_store=True, programs_per_sm=1),
        pair_tiles=replace(SMALL, tma_store=True, block_n=32),
        forward_tiles=replace(SMALL, programs_per_sm=2),
        chunk_size=32,
    )  # fmt: skip
    w_nce, w_cs = dense_pair(x, y, 0.05, s)
    assert float(nce) == pytest.approx(float(w_nce), rel=1e-5)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-6)
    got = torch.autograd.grad(nce + 0.3 * cs, [x, y, s])
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, [x, y, s])
    assert_grads_close(list(got), list(want), rtol=1e-4)
    # Every weight strip went through a descriptor (on CUDA float32 keeps pointers: see TritonStrips._grid).
    assert stores and (all(stores) or (CUDA and not any(stores)))


@pytest.mark.parametrize("which", ["infonce", "cs"])
def test_one_term_alone_backward_matches_dense(which: str) -> None:
    """A zero incoming gradient for the other term (its weights drop out of the strip: the kernel
    part's sign factor is 0, the InfoNCE part's weights are 0) still gives the dense gradients."""
    x, y = feats(40, 16), feats(40, 16, shift=0.3)
    s = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    t = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    got = dict(zip(("infonce", "cs"), fused_infonce_cs(x, y, t, s, tiles=SMALL, chunk_size=16), strict=True))
    want = dict(zip(("infonce", "cs"), dense_pair(x, y, t, s), strict=True))
    inputs = [x, y, t, s]
    g = torch.autograd.grad(got[which], inputs, allow_unused=True)
    w = torch.autograd.grad(want[which], inputs, allow_unused=True)
    for a, b in zip(g, w, strict=True):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            assert a is not None
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize(
    ("dtype", "temperature"), [(torch.bfloat16, 0.07), (torch.float32, 0.07), (torch.float32, 0.01)]
)
def test_well_aligned_pairs_keep_their_small_gradients(dtype: torch.dtype, temperature: float) -> None:
    """At a low loss the softmax at a positive is ~its weight and the gradient is their small
    difference: it must be formed before any rounding (a bf16 strip holding the softmax alone,
    corrected afterwards, lost half of it), and the temperature gradient with it."""
    g = torch.Generator().manual_seed(0)
    x0 = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    y0 = F.normalize(x0 + 0.2 * torch.randn(64, 32, generator=g) / 32**0.5, dim=-1)
    x, y = x0.to(DEVICE, dtype).requires_grad_(), y0.to(DEVICE, dtype).requires_grad_()
    t = torch.tensor(temperature, device=DEVICE, requires_grad=True)
    nce, _ = fused_infonce_cs(x, y, t, 1.0, tiles=SMALL, chunk_size=32)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    t64 = torch.tensor(temperature, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gx, gt = torch.autograd.grad(nce, [x, t])
    wx, wt = torch.autograd.grad(info_nce(x64, y64, t64), [x64, t64])
    assert float((gx.double() - wx).abs().max()) <= 2e-2 * float(wx.abs().max())
    assert float(gt) == pytest.approx(float(wt), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("weight", [1.0, 0.3, -0.7])
def test_small_sigma_cs_gradient_does_not_depend_on_the_loss_weight(weight: float) -> None:
    """sigma = 0.02: logits of -2500 nats. The backward's weights use the forward's own base-2
    log-sum (not one rebuilt from nats, nor with the loss weight folded into the exponent)."""
    x0, y0 = feats(45, 16).detach(), feats(45, 16).detach()
    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    _, cs = fused_infonce_cs(x, y, 0.07, 0.02, tiles=SMALL, chunk_size=16)
    x64, y64 = x0.double().requires_grad_(), y0.double().requires_grad_()
    got = torch.autograd.grad(weight * cs, [x, y])
    want = torch.autograd.grad(weight * cs_divergence(x64, y64, 0.02), [x64, y64])
    for a, b in zip(got, want, strict=True):
        assert float((a.double() - b).abs().max()) <= 1e-6 * float(b.abs().max())


@pytest.mark.parametrize("tiles", VARIANTS, ids=lambda t: f"tma{int(t.tma)}-pps{t.programs_per_sm}")
def test_diagonal_positives_two_launches_with_descriptor_stores(tiles: TritonStrips) -> None:
    """Positives on the diagonal with square tiles: the backward's main launch writes every tile
    without them, a second launch rewrites the diagonal tiles with them (through tensor-descriptor
    stores here, as the default backward tiles do)."""
    x, y = feats(48, 16), feats(48, 16, shift=0.3)
    s = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    t = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(x, y, t, s, tiles=replace(tiles, tma_store=True), chunk_size=32)
    w_nce, w_cs = dense_pair(x, y, t, s)
    inputs = [x, y, t, s]
    got = torch.autograd.grad(nce + 0.3 * cs, inputs)
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, inputs)
    assert_grads_close(list(got), list(want), rtol=1e-4)


@pytest.mark.parametrize("store_tma", [False, True])
@pytest.mark.parametrize(("split", "n", "captions"), [(2, 64, 0), (2, 57, 0), (4, 64, 0), (4, 70, 9)])
def test_split_epilogue_matches_dense(split: int, n: int, captions: int, store_tma: bool) -> None:
    """The backward X Y^T epilogue on 2 or 4 column blocks per tile (`epilogue_split`): positives on
    the diagonal (square tiles, a ragged last tile) and from several captions per image, through
    pointer and descriptor stores, with the temperature's and sigma's gradients."""
    width = 16 * split
    pair = replace(SMALL, block_m=width, block_n=width, epilogue_split=split, tma_store=store_tma, programs_per_sm=1)
    x, y = feats(n, 16), feats(n + captions, 16, shift=0.3)
    t2i = torch.cat([torch.arange(n), torch.randint(0, n, (captions,))]).to(DEVICE) if captions else None
    s = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    t = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(x, y, t, s, t2i, tiles=SMALL, pair_tiles=pair, forward_tiles=SMALL, chunk_size=width)
    w_nce, w_cs = dense_pair(x, y, t, s, t2i)
    inputs = [x, y, t, s]
    got = torch.autograd.grad(nce + 0.3 * cs, inputs)
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, inputs)
    assert_grads_close(list(got), list(want), rtol=1e-4)


@pytest.mark.parametrize(("split", "n"), [(2, 64), (4, 72)])  # rows of 16-byte multiples: descriptors
def test_symmetric_weights_stored_in_column_blocks_match_dense(split: int, n: int) -> None:
    """The kernel-weight tiles written through descriptors in 2 or 4 column blocks (`epilogue_split`
    on the X X^T / Y Y^T tiles): the fused loss and the separate CS strips (unequal pools, so the
    cross term's weights too), a ragged last tile included."""
    width = 16 * split
    tiles = replace(SMALL, block_m=width, block_n=width, epilogue_split=split, tma_store=True, programs_per_sm=1)
    x, y = feats(n, 16), feats(n, 16, shift=0.3)
    s = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    nce, cs = fused_infonce_cs(x, y, 0.05, s, tiles=tiles, pair_tiles=SMALL, chunk_size=width)
    w_nce, w_cs = dense_pair(x, y, 0.05, s)
    inputs = [x, y, s]
    got = torch.autograd.grad(nce + 0.3 * cs, inputs)
    want = torch.autograd.grad(w_nce + 0.3 * w_cs, inputs)
    assert float(cs) == pytest.approx(float(w_cs), rel=1e-5, abs=1e-6)
    assert_grads_close(list(got), list(want), rtol=1e-4)
    xa = torch.cat([x, feats(9, 16)])
    got_s = streamed_cs_divergence(xa, y, s, backend=tiles, chunk_size=width)
    want_s = cs_divergence(xa, y, s)
    assert float(got_s) == pytest.approx(float(want_s), rel=1e-5, abs=1e-6)
    assert_grads_close(list(torch.autograd.grad(got_s, inputs)), list(torch.autograd.grad(want_s, inputs)), rtol=1e-4)


def test_positives_in_a_tiles_first_and_last_rows() -> None:
    """Several captions per image: with 16-row tiles, texts 16..31 have one positive among images
    0..15 (image 15, a tile's last row) and texts 0..15 one among images 16..31 (image 16, a
    tile's first row); those tiles must still subtract it."""
    perm = torch.arange(40)
    perm[15], perm[16] = 16, 15
    t2i = torch.cat([perm, torch.tensor([33, 34, 35, 36, 37, 38])]).to(DEVICE)
    x, y = feats(40, 16), feats(46, 16, shift=0.3)
    t = torch.tensor(0.05, device=DEVICE, requires_grad=True)
    nce, _ = fused_infonce_cs(x, y, t, 0.5, t2i, tiles=SMALL, chunk_size=16)
    want = info_nce(x, y, t, t2i)
    got_g = torch.autograd.grad(nce, [x, y, t])
    want_g = torch.autograd.grad(want, [x, y, t])
    assert_grads_close(list(got_g), list(want_g), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "noise"), [(0.05, 0.02), (0.01, 0.3)])
def test_loss_value_near_zero_keeps_float32_precision(dtype: torch.dtype, temperature: float, noise: float) -> None:
    """The value subtracts each positive's logit as the tiles computed it (not a host dot of the
    same pair, ~1e-7 s apart), in float64 on the row and column sums: ~1e-7 absolute at a loss of
    1e-5 (it was ~1e-6 there, and 5e-6 at T = 0.01), both exp modes, a partial last tile."""
    g = torch.Generator().manual_seed(1)
    x0 = F.normalize(torch.randn(75, 32, generator=g), dim=-1)
    y0 = F.normalize(x0 + noise * torch.randn(75, 32, generator=g), dim=-1)
    x, y = x0.to(DEVICE, dtype), y0.to(DEVICE, dtype)
    nce, _ = fused_infonce_cs(x, y, temperature, 0.5, tiles=SMALL, chunk_size=32)
    want = float(info_nce(x.double(), y.double(), temperature))
    assert abs(float(nce) - want) <= 5e-7 * max(1.0, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "d", "block"), [(1, 1, 64), (7, 13, 64), (16, 32, 128), (5, 40, 4096)])
def test_finish_grad_is_addcmul_then_cast(dtype: torch.dtype, n: int, d: int, block: int) -> None:
    g = torch.Generator().manual_seed(n * d)
    acc = torch.randn(n, d, generator=g).to(DEVICE)
    mass = torch.randn(n, generator=g).to(DEVICE)
    a = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    want = acc.double() - mass.double().unsqueeze(1) * a.double()
    eps = torch.finfo(dtype).eps  # one rounding to dtype (float32: two, a product and a difference)
    got = fused_kernels._finish_grad(acc, mass, a, block=block)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps * 4)
    if not CUDA:  # the interpreter rounds to nearest even like torch (a GPU may fuse the product: 1 ulp)
        assert torch.equal(got, (acc - mass.unsqueeze(1) * a.float()).to(dtype))
    wide = torch.empty_like(a)  # the int64 offsets of arrays over 2^31 elements, on a small one
    grid = (-(-n * d // block),)
    fused_kernels._finish_grad_kernel[grid](acc, mass, a, wide, n * d, d, 1.0, BLOCK=block, EVEN=False, WIDE=True)
    assert torch.equal(wide, got)


def test_finish_grad_masks_by_a_size_over_2_to_31() -> None:
    """The first block of a (2^16 + 1, 2^15 + 3) array: n * d = 2,147,713,027 (not a multiple of the
    block) must not wrap in the mask (it did when the kernel multiplied its int32 n and d)."""
    block, n, d = 64, 2**16 + 1, 2**15 + 3
    g = torch.Generator().manual_seed(0)
    acc, mass, a = (torch.randn(block, generator=g).to(DEVICE) for _ in range(3))
    out = torch.full((block,), 12345.0, device=DEVICE)
    fused_kernels._finish_grad_kernel[(1,)](acc, mass, a, out, n * d, d, 1.0, BLOCK=block, EVEN=False, WIDE=True)
    torch.testing.assert_close(out, acc - mass[0] * a)
