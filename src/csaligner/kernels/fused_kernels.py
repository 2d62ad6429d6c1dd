"""The Triton kernels of the fused loss (`csaligner.kernels.fused`): X Y^T tiles for InfoNCE and the cross kernel.

* `_pair_lse_kernel`: the forward tile's InfoNCE row and column partials and the cross kernel's
  partial (and, with DIAGONAL, the positives' logits t_ii from the diagonal tiles);
* `_pair_grad_kernel` (launched by `_pair_grad`): the backward's weight strip
  H = s rho_i kappa_j G_ij + W_ij / sigma^2 with its per-row and per-column corrections;
* `_finish_grad_kernel` (`_finish_grad`): the last elementwise pass over an (N, D) gradient.

The tile configurations below were measured on an H100 (docs/BENCHMARKS.md). The arithmetic each
kernel implements is in `csaligner.kernels.fused`'s docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from csaligner.kernels.strips import MAX_BOUNDED_NATS
from csaligner.kernels.triton_kernels import (
    _LN2,
    _cast_out,
    _column_blocks,
    _dot_tile,
    _exp2,
    _lse2,
    _tile_span,
    _to,
    _valid,
)
from csaligner.kernels.triton_strips import HALF_DTYPES, TritonStrips, strip_dtype, sum_partials

MAX_ONE_EXP_SCALE = MAX_BOUNDED_NATS / 2
"""Up to this InfoNCE scale (temperature >= 0.025) all logits of a tile lie within 2 * scale <= 80
nats of each other, so one exp per logit with a shared offset stays inside float32's range."""

FORWARD_PAIR_TILES = TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2)
"""The forward X Y^T kernel's tiles: one warpgroup per 128 x 128 tile and two programs per SM, so
that one program's epilogue (two exps and three sums per logit) runs while the other's tensor-core
products do (measured on an H100 at N = 65,536: 17.8 ms with 8 warps and one program, 13.8 ms so)."""
SYMMETRIC_TILES = TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2, tma_store=True, epilogue_split=4)
"""The X X^T / Y Y^T kernels' tiles for half operands, for the same reason: one warpgroup per tile and
two programs per SM. These write a weight strip through the copy engine; staging a whole tile for
that took 32 KiB of shared memory, so with 64-wide K steps two programs no longer fitted an SM
(26.2 ms at N = 65,536 on an H100) and 32-wide steps with four stages were the default (20.2 ms).
Stored in 4 column blocks (`epilogue_split`) the staging takes 8 KiB, and 64-wide steps with three
stages fit twice (104 KiB): 19.7 -> 18.4 ms in one run (docs/BENCHMARKS.md)."""
SYMMETRIC_TILES_FLOAT32 = TritonStrips(block_k=32, num_warps=4, num_stages=4, programs_per_sm=2, tma_store=True)
"""The X X^T / Y Y^T kernels' tiles for float32 operands (a program per tile, pointer loads and stores on
CUDA: see `TritonStrips._grid`): 32-wide K steps. With 64-wide ones (the half-operand tiles) the sm_90a
compile has 32 registers and 13 KB of spill stack (`benchmarks/sass_counts.py`)."""
BACKWARD_PAIR_TILES = TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2, tma_store=True, epilogue_split=4)
"""The backward X Y^T kernel's tiles for half operands: one warpgroup per tile and two programs per
SM, as the forward's, with the epilogue run on 4 column blocks of the tile one after the other
(`TritonStrips.epilogue_split`). Unsplit, that epilogue needed too many registers for 4 warps (it
spilled 2.4 KB and took 81 ms instead of 25 ms), so it ran with 8 warps and one program per SM;
split, it has 16 bytes of stack and 104 KiB of shared memory, and two programs fit. Measured on an
H100 at N = 65,536 (docs/BENCHMARKS.md): the kernel 23.3 -> 21.3 ms, the step 118.0 -> 115.8 ms.
The weight strip goes out through the copy engine (tma_store; 25.3 -> 23.2 ms with 8 warps)."""
BACKWARD_PAIR_TILES_FLOAT32 = TritonStrips(tma_store=True)
"""The backward X Y^T kernel's tiles for float32 operands (exact dots on CUDA cores, a program per
tile, pointer loads: see `TritonStrips._grid`): 8 warps. With the 4-warp tiles above the sm_90a
compile has 32 registers and 14 KB of spill stack (`benchmarks/sass_counts.py`)."""


def backward_pair_tiles(dtype: torch.dtype) -> TritonStrips:
    """The measured default of the backward X Y^T kernel for operands of this dtype."""
    return BACKWARD_PAIR_TILES if dtype in HALF_DTYPES else BACKWARD_PAIR_TILES_FLOAT32


def symmetric_tiles(dtype: torch.dtype) -> TritonStrips:
    """The measured default of the X X^T / Y Y^T kernels for operands of this dtype."""
    return SYMMETRIC_TILES if dtype in HALF_DTYPES else SYMMETRIC_TILES_FLOAT32


@triton.jit
def _pair_logits2(
    X, Y, R2, KAPPA, U2, V2, tm, tn, n_a, n_b, dim, c2, t_off,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Base-2 logits of a tile, offsets included (each exp is then one MUFU.EX2):

    t = r2_i kappa_j x_i.y_j + t_off  (r2 = log2(e) s rho: InfoNCE's logit times log2(e)),
    k = min(c2 x_i.y_j + u2_i + v2_j, 0)  (the kernel logit times log2(e): u2, v2 = log2(e) u, v and
    c2 = log2(e) / sigma^2)."""
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    dot = _dot_tile(X, Y, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA)
    r2 = tl.load(R2 + rows, mask=rows < n_a, other=0.0)
    kappa = tl.load(KAPPA + cols, mask=cols < n_b, other=0.0)
    u2 = tl.load(U2 + rows, mask=rows < n_a, other=0.0)
    v2 = tl.load(V2 + cols, mask=cols < n_b, other=0.0)
    t = dot * r2[:, None] * kappa[None, :] + t_off
    return t, tl.minimum(dot * c2 + u2[:, None] + v2[None, :], 0.0), dot


@triton.jit
def _pair_lse_tile(
    pid,
    X, Y, R2, KAPPA, U2, V2, ROW_PART, COL_PART, K_PART,
    n_a, n_b, dim, s2, c2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, K_BOUNDED: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    # ONE_EXP: |logit| <= s <= 40 (unit vectors): one exp per logit, offset by the bound s, no max.
    t_off = -s2 if ONE_EXP else 0.0
    t, k, _ = _pair_logits2(X, Y, R2, KAPPA, U2, V2, tm, tn, n_a, n_b, dim, c2, t_off, BM, BN, BK, PREC, UPCAST, TMA)
    if not EVEN:
        valid = _valid(rows, cols, n_a, n_b)
        t = tl.where(valid, t, float("-inf"))
        k = tl.where(valid, k, float("-inf"))
    # Partials: linear sums where no max offset is needed (the caller takes the logs: a log per
    # column here would be a polynomial per element of the tile), else log2-sum-exp2s. Both stay in
    # base 2 up to the loss value, so the backward's offsets match these logits to the last bits.
    if ONE_EXP:
        e = _exp2(t)
        r_part = tl.sum(e, 1)
        c_part = tl.sum(e, 0)
    else:
        r_part = _lse2(t, 1)
        c_part = _lse2(t, 0)
    tl.store(ROW_PART + tn * n_a + rows, r_part, mask=rows < n_a)
    tl.store(COL_PART + tm * n_b + cols, c_part, mask=cols < n_b)
    if K_BOUNDED:  # noqa: SIM108 (every kernel logit lies in [-80, 0] nats: sum exp directly, no max)
        k_part = tl.sum(tl.sum(_exp2(k), 1), 0)
    else:
        k_part = _lse2(tl.reshape(k, (BM * BN,)), 0)
    tl.store(K_PART + tm * n_tn + tn, k_part)


@triton.jit
def _pair_diagonal_tile(
    pid, X, Y, R2, KAPPA, U2, V2, OUT, n_a, n_b, dim, s2, c2,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, ONE_EXP: tl.constexpr,
):  # fmt: skip
    """OUT[i] = t_ii of diagonal tile `pid` (BM == BN), the very float32 the forward tile exponentiated:
    the loss value subtracts it from the row and column sums, so the positive's rounding cancels."""
    t_off = -s2 if ONE_EXP else 0.0
    t, _, _ = _pair_logits2(X, Y, R2, KAPPA, U2, V2, pid, pid, n_a, n_b, dim, c2, t_off, BM, BN, BK, PREC, UPCAST, TMA)
    rows = pid * BM + tl.arange(0, BM)
    cols = pid * BN + tl.arange(0, BN)
    diag = tl.sum(tl.where(rows[:, None] == cols[None, :], t, 0.0), 1)
    tl.store(OUT + rows, diag, mask=rows < n_a)


@triton.jit
def _pair_lse_kernel(
    X, Y, R2, KAPPA, U2, V2, ROW_PART, COL_PART, K_PART,
    n_a, n_b, dim, s2, c2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, K_BOUNDED: tl.constexpr, DIAGONAL: tl.constexpr = False,
):  # fmt: skip
    """DIAGONAL: only the n_tm diagonal tiles, each writing its t_ii into ROW_PART (N,) (a separate
    compile: the main launch's code does not change)."""
    if DIAGONAL:
        for pid in tl.range(tl.program_id(0), n_tm, tl.num_programs(0)):
            _pair_diagonal_tile(pid, X, Y, R2, KAPPA, U2, V2, ROW_PART, n_a, n_b, dim, s2, c2, BM, BN, BK, PREC,
                UPCAST, TMA, ONE_EXP)  # fmt: skip
    elif FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _pair_lse_tile(pid, X, Y, R2, KAPPA, U2, V2, ROW_PART, COL_PART, K_PART, n_a, n_b, dim, s2, c2,
                n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, EVEN, ONE_EXP, K_BOUNDED)  # fmt: skip
    else:
        _pair_lse_tile(tl.program_id(0), X, Y, R2, KAPPA, U2, V2, ROW_PART, COL_PART, K_PART, n_a, n_b, dim, s2,
            c2, n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, EVEN, ONE_EXP, K_BOUNDED)  # fmt: skip


@triton.jit
def _softmax_mass(t, row_a, col_b, w_row, w_col, ONE_EXP: tl.constexpr):
    """G_ij = w_row p_ij + w_col q_ij, the InfoNCE softmax weights of a tile before the scale (see
    `_pair_grad_body` for row_a and col_b in each mode)."""
    if ONE_EXP:
        return _exp2(t) * (row_a[:, None] + col_b[None, :])
    else:
        return w_row * _exp2(t - row_a[:, None]) + w_col * _exp2(t - col_b[None, :])


@triton.jit
def _pair_grad_body(
    tm, tn, rows, cols,
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART, GRAD_SCAL,
    n_a, n_b, dim, s, s2, c2, r0, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """One tile: its dot products, then the epilogue on SPLIT column blocks of BN / SPLIT one after
    the other (`_pair_grad_part`), so that fewer (BM, .) float32 temporaries are live at once.
    GRAD_SCAL: the float32 (k_off, k_scale, w_row, w_col) in device memory (see `_pair_grad`)."""
    dot = _dot_tile(X, Y, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA)
    r2 = tl.load(R2 + rows, mask=rows < n_a, other=0.0)
    u2 = tl.load(U2 + rows, mask=rows < n_a, other=0.0)
    row_a = tl.load(ROW_A + rows, mask=rows < n_a, other=0.0)
    rho = tl.load(RHO + rows, mask=rows < n_a, other=0.0)
    row_vecs = (r2, u2, row_a, rho)
    scalars = (s, s2, c2, GRAD_SCAL, r0)
    ptrs = (KAPPA, V2, COL_B, POS_ROW, POS_W, H, COL_PART)
    W: tl.constexpr = BN // SPLIT
    blocks = _column_blocks(dot, BM, BN, SPLIT)
    resid, gl, wk = _pair_grad_part(blocks[0], tm, tn * BN, rows, row_vecs, ptrs, n_a, n_b, scalars,
        BM, W, PREC, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES)  # fmt: skip
    for i in tl.static_range(1, SPLIT):
        part = _pair_grad_part(blocks[i], tm, tn * BN + i * W, rows, row_vecs, ptrs, n_a, n_b, scalars,
            BM, W, PREC, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES)  # fmt: skip
        resid, gl, wk = resid + part[0], gl + part[1], wk + part[2]
    tl.store(ROW_PART + tn * n_a + rows, resid + rho * rho * gl, mask=rows < n_a)
    tl.store(DOT_PART + 2 * (tm * n_tn + tn), tl.sum(gl, 0))
    tl.store(DOT_PART + 2 * (tm * n_tn + tn) + 1, wk * _LN2)


@triton.jit
def _pair_grad_part(
    dot, tm, c0, rows, row_vecs, ptrs, n_a, n_b, scalars,
    BM: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr, EVEN: tl.constexpr, ONE_EXP: tl.constexpr,
    WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
):  # fmt: skip
    """The epilogue of the (BM, W) block of a tile whose columns start at c0: writes its H block and
    its column corrections, returns (row sums of the rounded kernel mass, row sums of G l, sum w k)."""
    r2, u2, row_a, rho = row_vecs
    KAPPA, V2, COL_B, POS_ROW, POS_W, H, COL_PART = ptrs
    s, s2, c2, GRAD_SCAL, r0 = scalars
    k_off, k_scale = tl.load(GRAD_SCAL), tl.load(GRAD_SCAL + 1)  # read where used: fewer live registers
    w_row, w_col = tl.load(GRAD_SCAL + 2), tl.load(GRAD_SCAL + 3)
    cols = c0 + tl.arange(0, W)
    kappa = tl.load(KAPPA + cols, mask=cols < n_b, other=0.0)
    v2 = tl.load(V2 + cols, mask=cols < n_b, other=0.0)
    col_b = tl.load(COL_B + cols, mask=cols < n_b, other=0.0)
    t_off = -s2 if ONE_EXP else 0.0
    t = dot * r2[:, None] * kappa[None, :] + t_off  # as `_pair_logits2`
    k = tl.minimum(dot * c2 + u2[:, None] + v2[None, :], 0.0)
    sr = s * rho
    # nce = dL/d(x_i.y_j) from InfoNCE = G_ij s rho_i kappa_j. The positives' -pos_w go in, in float32,
    # before anything is rounded: at a low loss the softmax at a positive is ~pos_w, and only their
    # difference may reach the bf16 strip (and sum(G l)).
    if ONE_EXP:  # G = 2^t (row_a_i + col_b_j): row_a = w_row exp(s - r), col_b = w_col exp(s - c)
        nce = _exp2(t) * ((row_a * sr)[:, None] * kappa[None, :] + sr[:, None] * (col_b * kappa)[None, :])
    else:  # row_a, col_b: the log-sum-exps times log2(e)
        g = w_row * _exp2(t - row_a[:, None]) + w_col * _exp2(t - col_b[None, :])
        nce = g * sr[:, None] * kappa[None, :]
    # At a positive, pos_w comes off the softmax mass before the scale sr kappa multiplies it: on
    # CUDA an FMA-contracted nce - pos_w sr kappa kept nce's rounding (~1 ulp of s / N), far above the
    # true difference of a well-aligned pair (the interpreter does not contract: only GPUs saw it).
    if POSITIVES == 1:  # a diagonal tile: column j's positive is the strip's row j - r0
        pw = tl.load(POS_W + r0 + rows, mask=(rows < n_a) & (r0 + rows < n_b), other=0.0)
        excess = _softmax_mass(t, row_a, col_b, w_row, w_col, ONE_EXP) - pw[:, None]
        nce = tl.where((r0 + rows)[:, None] == cols[None, :], excess * sr[:, None] * kappa[None, :], nce)
    elif POSITIVES == 2:  # POS_ROW[j]: column j's strip-local positive row, or -1
        pos_row = tl.load(POS_ROW + cols, mask=cols < n_b, other=-1)
        if tl.max(((pos_row >= tm * BM) & (pos_row < tm * BM + BM)).to(tl.int32), 0) > 0:
            pos_w = tl.load(POS_W + cols, mask=cols < n_b, other=0.0)
            excess = _softmax_mass(t, row_a, col_b, w_row, w_col, ONE_EXP) - pos_w[None, :]
            nce = tl.where(rows[:, None] == pos_row[None, :], excess * sr[:, None] * kappa[None, :], nce)
    w = _exp2(k + k_off)  # exp(kernel logit - log_z); g_k / sigma^2 is k_scale
    if not EVEN:
        valid = _valid(rows, cols, n_a, n_b)
        nce = tl.where(valid, nce, 0.0)
        w = tl.where(valid, w, 0.0)
    stored = _cast_out(H, nce + k_scale * w, STORE_TMA)
    if STORE_TMA:
        H.store([tm * BM, c0], stored)
    elif EVEN:
        tl.store(H + rows[:, None] * n_b + cols[None, :], stored)
    else:
        tl.store(H + rows[:, None] * n_b + cols[None, :], stored, mask=_valid(rows, cols, n_a, n_b))
    resid = stored.to(tl.float32) - nce  # the kernel mass as stored, rounding included
    # G times the natural InfoNCE logit l = s rho_i kappa_j x_i.y_j, i.e. nce x_i.y_j: one product with
    # the dot tile. Float32 operands (CUDA-core dots) take x_i.y_j back from t instead: keeping their
    # dot tile alive made the sm_90a compile spill 5.9 KB. Masked rows and columns have rho, kappa 0.
    if PREC == "ieee":
        inv_r = tl.where(rho > 0, (_LN2 / s) / tl.where(rho > 0, rho, 1.0), 0.0)
        inv_k = tl.where(kappa > 0, 1.0 / tl.where(kappa > 0, kappa, 1.0), 0.0)
        gl = nce * (t - t_off) * inv_r[:, None] * inv_k[None, :]
    else:
        gl = nce * dot
    tl.store(COL_PART + tm * n_b + cols, tl.sum(resid + (kappa * kappa)[None, :] * gl, 0), mask=cols < n_b)
    wk = 0.0
    if WANT_SIGMA:  # sum of the weights times the natural kernel logit k ln 2 (k is offset-free)
        wk = tl.sum(tl.sum(w * k, 1), 0)
    return tl.sum(resid, 1), tl.sum(gl, 1), wk


@triton.jit
def _pair_grad_tile(
    pid,
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART, GRAD_SCAL,
    n_a, n_b, dim, s, s2, c2, r0, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """POSITIVES: 0, every tile without positives; 1, tile `pid` of the strip's diagonal (which
    holds them all) again, positives applied, overwriting what 0 wrote there; 2, any tile,
    positives from POS_ROW. 0 then 1 keeps the extra registers of the positives off the main
    launch (its tiles would spill) for the cost of recomputing one tile in N / 128."""
    if POSITIVES == 1:
        tm = pid
        tn = pid + r0 // BN
        rows = tm * BM + tl.arange(0, BM)
        cols = tn * BN + tl.arange(0, BN)
    else:
        tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    _pair_grad_body(tm, tn, rows, cols, X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H,
        ROW_PART, COL_PART, DOT_PART, GRAD_SCAL, n_a, n_b, dim, s, s2, c2, r0, n_tn,
        BM, BN, BK, PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES, SPLIT)  # fmt: skip


@triton.jit
def _pair_grad_kernel(
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART, GRAD_SCAL,
    n_a, n_b, dim, s, s2, c2, r0, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
    SPLIT: tl.constexpr = 1,
):  # fmt: skip
    n_tiles = n_tm if POSITIVES == 1 else n_tm * n_tn
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
            _pair_grad_tile(pid, X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART,
                DOT_PART, GRAD_SCAL, n_a, n_b, dim, s, s2, c2, r0, n_tm, n_tn, BM, BN, BK, GROUP_M,
                PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES, SPLIT)  # fmt: skip
    else:
        _pair_grad_tile(tl.program_id(0), X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART,
            COL_PART, DOT_PART, GRAD_SCAL, n_a, n_b, dim, s, s2, c2, r0, n_tm, n_tn, BM, BN, BK,
            GROUP_M, PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES, SPLIT)  # fmt: skip


@triton.jit
def _finish_grad_kernel(G, MASS, A, OUT, numel, d, scale, BLOCK: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr):
    """OUT = (G - MASS[:, None] * A) * scale over BLOCK elements of the flattened (numel / d, d) arrays (numel
    from the host: an int64 argument when over 2^31, where n * d in the kernel would wrap)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK if WIDE else tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if EVEN:
        g = tl.load(G + offs)
        a = tl.load(A + offs).to(tl.float32)
        mass = tl.load(MASS + offs // d)
        tl.store(OUT + offs, _to((g - mass * a) * scale, OUT.dtype.element_ty))
    else:
        ok = offs < numel
        g = tl.load(G + offs, mask=ok, other=0.0)
        a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
        mass = tl.load(MASS + offs // d, mask=ok, other=0.0)
        tl.store(OUT + offs, _to((g - mass * a) * scale, OUT.dtype.element_ty), mask=ok)


def _finish_grad(g: Tensor, mass: Tensor, a: Tensor, scale: float = 1.0, block: int = 4096) -> Tensor:
    """(g - mass[:, None] * a) * scale in a's dtype, one read of the float32 g and one write: replaces an
    in-place addcmul (a broadcast over mixed dtypes, which torch runs unvectorised) and a cast."""
    out = torch.empty_like(a)
    n, d = a.shape
    if n * d:
        _finish_grad_kernel[(triton.cdiv(n * d, block),)](
            g, mass, a, out, n * d, d, float(scale),
            BLOCK=block, EVEN=n * d % block == 0, WIDE=n * d + block >= 2**31, num_warps=4,
        )  # fmt: skip
    return out


def _pair_grad(
    tiles: TritonStrips,
    x: Tensor,
    y: Tensor,
    r2: Tensor,
    rho: Tensor,
    kappa: Tensor,
    u2: Tensor,
    v2: Tensor,
    row_a: Tensor,
    col_b: Tensor,
    pos_row: Tensor,
    pos_w: Tensor,
    scalars: tuple[float, float, float, int],
    grad_scalars: Tensor,
    one_exp: bool,
    want_sigma: bool,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One strip: H (S, M) in the strip dtype, row and column corrections R, C, and (sum G l, sum w k)
    with w = exp(k - log_z) the kernel weights before their factor g_k.

    scalars: (s, s2, c2, r0), host numbers; grad_scalars: the float32 (4,) tensor (k_off, k_scale,
    w_row, w_col) on x's device, which the kernel reads from memory: they depend on the incoming
    gradients, and the backward pass launches its first strip before those reach the host.
    Positives: pos_row[j] is column j's strip-local positive row or -1; with `diagonal` it is
    j - r0 (r0, the strip's first row, is the last of `scalars`), and square tiles take them from
    the diagonal tiles alone."""
    if grad_scalars.shape != (4,) or grad_scalars.dtype != torch.float32 or grad_scalars.device != x.device:
        raise ValueError(
            f"grad_scalars must be a float32 (4,) tensor on {x.device} (k_off, k_scale, w_row, w_col), got "
            f"{grad_scalars.dtype} {tuple(grad_scalars.shape)} on {grad_scalars.device}"
        )
    n_tm, n_tn = tiles._tiles(x, y)
    h = torch.empty((x.shape[0], y.shape[0]), dtype=strip_dtype(x.dtype), device=x.device)
    row_part = torch.empty((n_tn, x.shape[0]), dtype=torch.float32, device=x.device)
    col_part = torch.empty((n_tm, y.shape[0]), dtype=torch.float32, device=x.device)
    dots = torch.empty((n_tm * n_tn, 2), dtype=torch.float32, device=x.device)
    h_arg, store_tma = tiles._out_operand(h, x, y, tiles.block_n // tiles.epilogue_split)
    args = (r2, rho, kappa, u2, v2, row_a, col_b, pos_row, pos_w, h_arg, row_part, col_part, dots, grad_scalars)

    def launch(positives: int, n_tiles: int | None = None) -> None:
        tiles._launch(
            _pair_grad_kernel, x, y, *args, scalars=scalars, n_tiles=n_tiles, ONE_EXP=one_exp,
            WANT_SIGMA=want_sigma, STORE_TMA=store_tma, POSITIVES=positives, SPLIT=tiles.epilogue_split,
        )  # fmt: skip

    r0 = int(scalars[-1])
    if diagonal and r0 + x.shape[0] > y.shape[0]:
        raise ValueError(f"diagonal positives need the strip's rows {r0}..{r0 + x.shape[0]} within y's {y.shape[0]}")
    if diagonal and tiles.block_m == tiles.block_n and r0 % tiles.block_m == 0:
        launch(0)  # every tile, without positives
        launch(1, n_tiles=n_tm)  # the diagonal tiles again, with their positives
    else:
        launch(2)
    return h, sum_partials(row_part), sum_partials(col_part), dots.sum(0)
