"""InfoNCE + D_CS in one pass over the shared Gram matrix X Y^T (Triton; CUDA or the interpreter).

When the CS pools are the paired features themselves (no unpaired extras), InfoNCE's logits
s * x_i.y_j / (|x_i| |y_j|) and the cross kernel's logits -|x_i - y_j|^2 / (2 sigma^2) are two
elementwise maps of the same dot products. `fused_infonce_cs` computes that Gram tile once:

* forward: one kernel gives InfoNCE's row and column partials and the cross kernel's partial from
  each tile (sums of exps where no max offset is needed, else log-sum-exps); the symmetric X X^T
  and Y Y^T terms use the strip kernels of `triton_kernels` (upper triangle only). When the
  features need gradients these write their weight strips right away (offset 0, the diagonal's
  logit) and keep the (N, D) gradients, so the backward pass does not sweep X X^T and Y Y^T again
  (see `chunked.kernel_term_grads`). With positives on the diagonal, a launch over the n / 128
  diagonal tiles returns each positive's logit exactly as the tiles computed it, so that InfoNCE's
  value is a difference of consistent numbers (precise near a zero loss; `_info_nce_value`).
* backward: one kernel writes a single weight strip H = s rho_i kappa_j G_ij + W_ij / sigma^2
  (G: InfoNCE's dL/dlogit, the positives' -pos_w included in float32 before rounding; W: the
  kernel weights; rho/kappa: inverse norms) in bfloat16 for half inputs, plus per-row and
  per-column corrections. Two cuBLAS GEMMs apply it:

      dX_i = sum_j H_ij y_j - x_i R_i,   dY_j = sum_i H_ij x_i - y_j C_j,

  where R_i = sum_j (H~_ij - s rho_i kappa_j G_ij) + rho_i^2 sum_j G_ij l_ij, with H~ the stored
  (rounded) strip. The first sum is the kernel mass of the *rounded* weights, so the difference
  sum_j W_ij (y_j - x_i) cancels exactly whatever the strip precision; the second is the radial
  part of InfoNCE's gradient through the normalisation (x / |x|), so InfoNCE sees unit vectors
  while D_CS sees the raw features, exactly as the dense reference computes them.

All gradients (XY, XX, YY) accumulate into one float32 (N, D) and one (M, D) buffer, and the
kernel-term scale factors are folded into the weights. Memory: O((N + M) D) plus one strip.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from csaligner._validation import check_features, check_positive, check_same_dim
from csaligner.kernels.chunked import (
    LOG2,
    MAX_BOUNDED_NATS,
    _as_tensor,
    _half_sq_norms,
    autocast_off,
    kernel_term_sums,
    mm_accumulate,
    positive_dots,
    positives,
)
from csaligner.kernels.triton_kernels import (
    _LN2,
    LN2,
    LOG2E,
    TritonStrips,
    _cast_out,
    _dot_tile,
    _exp2,
    _lse2,
    _store_tile,
    _tile_span,
    _to,
    _valid,
    strip_dtype,
)

MAX_ONE_EXP_SCALE = MAX_BOUNDED_NATS / 2
"""Up to this InfoNCE scale (temperature >= 0.025) all logits of a tile lie within 2 * scale <= 80
nats of each other, so one exp per logit with a shared offset stays inside float32's range."""

FORWARD_PAIR_TILES = TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2)
"""The forward X Y^T kernel's tiles: one warpgroup per 128 x 128 tile and two programs per SM, so
that one program's epilogue (two exps and three sums per logit) runs while the other's tensor-core
products do (measured on an H100 at N = 65,536: 17.8 ms with 8 warps and one program, 13.8 ms so)."""
SYMMETRIC_TILES = TritonStrips(block_k=32, num_warps=4, num_stages=4, programs_per_sm=2, tma_store=True)
"""The X X^T / Y Y^T kernels' tiles, for the same reason. These write a weight strip, whose staging
takes 32 KiB of shared memory: with 64-wide K steps two programs no longer fit in an SM, with 32-wide
ones and four stages they do (H100, N = 65,536: 23.1 ms with 8 warps, 21.5 ms with 4 warps and
64-wide steps, 20.2 ms so; docs/BENCHMARKS.md)."""
BACKWARD_PAIR_TILES = TritonStrips(tma_store=True)
"""The backward X Y^T kernel's tiles: its epilogue needs too many registers for one warpgroup per
tile (with 4 warps it spills and takes 81 ms instead of 25 ms), so 8 warps and one program per SM;
the weight strip goes out through the copy engine (25.3 -> 23.2 ms; the symmetric kernels, two
programs per SM, got slower with it: 22.7 -> 26.2 ms)."""


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
def _pair_grad_body(
    tm, tn, rows, cols,
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART,
    n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
):  # fmt: skip
    t_off = -s2 if ONE_EXP else 0.0
    t, k, dot = _pair_logits2(X, Y, R2, KAPPA, U2, V2, tm, tn, n_a, n_b, dim, c2, t_off, BM, BN, BK, PREC, UPCAST, TMA)
    row_a = tl.load(ROW_A + rows, mask=rows < n_a, other=0.0)
    col_b = tl.load(COL_B + cols, mask=cols < n_b, other=0.0)
    rho = tl.load(RHO + rows, mask=rows < n_a, other=0.0)
    kappa = tl.load(KAPPA + cols, mask=cols < n_b, other=0.0)
    sr = s * rho
    # nce = dL/d(x_i.y_j) from InfoNCE = G_ij s rho_i kappa_j. The positives' -pos_w go in, in float32,
    # before anything is rounded: at a low loss the softmax at a positive is ~pos_w, and only their
    # difference may reach the bf16 strip (and sum(G l)).
    if ONE_EXP:  # G = 2^t (row_a_i + col_b_j): row_a = w_row exp(s - r), col_b = w_col exp(s - c)
        nce = _exp2(t) * ((row_a * sr)[:, None] * kappa[None, :] + sr[:, None] * (col_b * kappa)[None, :])
    else:  # row_a, col_b: the log-sum-exps times log2(e)
        g = w_row * _exp2(t - row_a[:, None]) + w_col * _exp2(t - col_b[None, :])
        nce = g * sr[:, None] * kappa[None, :]
    if POSITIVES == 1:  # a diagonal tile: column j's positive is the strip's row j - r0
        pw = tl.load(POS_W + r0 + rows, mask=(rows < n_a) & (r0 + rows < n_b), other=0.0)
        nce = tl.where((r0 + rows)[:, None] == cols[None, :], nce - (pw * sr)[:, None] * kappa[None, :], nce)
    elif POSITIVES == 2:  # POS_ROW[j]: column j's strip-local positive row, or -1
        pos_row = tl.load(POS_ROW + cols, mask=cols < n_b, other=-1)
        if tl.max(((pos_row >= tm * BM) & (pos_row < tm * BM + BM)).to(tl.int32), 0) > 0:
            pos_w = tl.load(POS_W + cols, mask=cols < n_b, other=0.0)
            nce -= tl.where(rows[:, None] == pos_row[None, :], sr[:, None] * (pos_w * kappa)[None, :], 0.0)
    w = _exp2(k + k_off)  # exp(kernel logit - log_z); g_k / sigma^2 is k_scale
    if not EVEN:
        valid = _valid(rows, cols, n_a, n_b)
        nce = tl.where(valid, nce, 0.0)
        w = tl.where(valid, w, 0.0)
    stored = _cast_out(H, nce + k_scale * w, STORE_TMA)
    _store_tile(H, stored, tm, tn, n_a, n_b, BM, BN, EVEN, STORE_TMA)
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
    row_gl = tl.sum(gl, 1)
    tl.store(ROW_PART + tn * n_a + rows, tl.sum(resid, 1) + rho * rho * row_gl, mask=rows < n_a)
    tl.store(COL_PART + tm * n_b + cols, tl.sum(resid + (kappa * kappa)[None, :] * gl, 0), mask=cols < n_b)
    tl.store(DOT_PART + 2 * (tm * n_tn + tn), tl.sum(row_gl, 0))
    if WANT_SIGMA:  # sum of the weights times the natural kernel logit k ln 2 (k is offset-free)
        tl.store(DOT_PART + 2 * (tm * n_tn + tn) + 1, tl.sum(tl.sum(w * k, 1), 0) * _LN2)
    else:
        tl.store(DOT_PART + 2 * (tm * n_tn + tn) + 1, 0.0)


@triton.jit
def _pair_grad_tile(
    pid,
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART,
    n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
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
        ROW_PART, COL_PART, DOT_PART, n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tn,
        BM, BN, BK, PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES)  # fmt: skip


@triton.jit
def _pair_grad_kernel(
    X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART,
    n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr, STORE_TMA: tl.constexpr, POSITIVES: tl.constexpr,
):  # fmt: skip
    n_tiles = n_tm if POSITIVES == 1 else n_tm * n_tn
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
            _pair_grad_tile(pid, X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART, COL_PART,
                DOT_PART, n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tm, n_tn, BM, BN, BK, GROUP_M,
                PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES)  # fmt: skip
    else:
        _pair_grad_tile(tl.program_id(0), X, Y, R2, RHO, KAPPA, U2, V2, ROW_A, COL_B, POS_ROW, POS_W, H, ROW_PART,
            COL_PART, DOT_PART, n_a, n_b, dim, s, s2, c2, k_off, k_scale, w_row, w_col, r0, n_tm, n_tn, BM, BN, BK,
            GROUP_M, PREC, UPCAST, TMA, EVEN, ONE_EXP, WANT_SIGMA, STORE_TMA, POSITIVES)  # fmt: skip


class _PairedInfoNCECS(torch.autograd.Function):
    """(InfoNCE, D_CS) of the same features; see the module docstring."""

    @staticmethod
    @autocast_off
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        sigma: Tensor,
        pos_row: Tensor,
        pos_w: Tensor,
        tile_set: tuple[TritonStrips, TritonStrips, TritonStrips],
        rows: int,
        eager: bool,
        identity: bool,
        ranks: _Ranks,
    ) -> tuple[Tensor, Tensor]:
        n, m = x.shape[0], y.shape[0]
        tiles, pair, _ = tile_set  # symmetric, forward X Y^T (, backward X Y^T)
        lo, hi = ranks.share(n, pair.block_m)  # this rank's rows of X Y^T (all of them in one process)
        (rho, hx), (kappa, hy) = _norm_terms(x), _norm_terms(y)
        # Host scalars, read in one transfer before any strip is queued: a read after them would wait
        # for all of them and leave the GPU idle while the caller starts the backward pass.
        s, sigma_f, max_inv_norms = torch.stack([scale, sigma, 1 / rho.min() + 1 / kappa.min()]).tolist()
        inv_s2 = 1.0 / sigma_f**2
        u, v = hx * -inv_s2, hy * -inv_s2  # -|a|^2 / (2 sigma^2)
        s2 = s * LOG2E
        k_parts2 = []
        # Kernel logits >= -(|x| + |y|)^2 / (2 sigma^2): when that is >= -80, tiles need no max.
        bounded = max_inv_norms**2 * inv_s2 / 2 <= MAX_BOUNDED_NATS
        one_exp = s <= MAX_ONE_EXP_SCALE  # the InfoNCE partials are sums of 2^(l log2(e) - s2)
        # one_exp: linear sums of 2^t (t <= 0 and >= -2 s2 >= -116: no float32 under- or overflow,
        # so the columns add up across strips without logs), else log2-sum-exp2s.
        row_acc = torch.empty(hi - lo, dtype=torch.float32, device=x.device)
        col_acc = torch.full((m,), 0.0 if one_exp else -math.inf, dtype=torch.float32, device=x.device)
        r2, u2, v2 = rho * s2, u * LOG2E, v * LOG2E  # base-2 logits in the kernels
        for r0 in range(lo, hi, rows):
            r1 = min(r0 + rows, hi)
            n_tm, n_tn = pair._tiles(x[r0:r1], y)
            row_part = torch.empty((n_tn, r1 - r0), dtype=torch.float32, device=x.device)
            col_part = torch.empty((n_tm, m), dtype=torch.float32, device=x.device)
            k_part = torch.empty(n_tm * n_tn, dtype=torch.float32, device=x.device)
            pair._launch(
                _pair_lse_kernel, x[r0:r1], y, r2[r0:r1], kappa, u2[r0:r1], v2, row_part, col_part, k_part,
                scalars=(s2, inv_s2 * LOG2E), ONE_EXP=one_exp, K_BOUNDED=bounded,
            )  # fmt: skip
            if one_exp:
                row_acc[r0 - lo : r1 - lo] = row_part.sum(0)
                col_acc += col_part.sum(0)
            else:
                row_acc[r0 - lo : r1 - lo] = _logsumexp2(row_part, 0)
                torch.logaddexp2(col_acc, _logsumexp2(col_part, 0), out=col_acc)
            k_parts2.append(k_part.sum().log2() if bounded else _logsumexp2(k_part, 0))
        col_acc = ranks.sum_(col_acc) if one_exp else ranks.logsumexp(col_acc, base2=True)
        lz2_xy = ranks.logsumexp(_logsumexp2(torch.stack(k_parts2), 0) if k_parts2 else _minus_inf(x), base2=True)
        # The backward's softmax normalisers, base 2; one_exp: log2 of the sums of 2^(t), t = log2(e) l - s2
        # (so without + s2: adding it here and taking it off there would round every softmax at s2's scale).
        row_lse2, col_lse2 = (row_acc.log2(), col_acc.log2()) if one_exp else (row_acc, col_acc)
        diag2 = None
        if identity and pair.block_m == pair.block_n:  # the positives' t_ii, as the tiles computed them
            diag2 = torch.empty(n, dtype=torch.float32, device=x.device)
            pair._launch(
                _pair_lse_kernel, x, y, r2, kappa, u2, v2, diag2, diag2, diag2, scalars=(s2, inv_s2 * LOG2E),
                n_tiles=triton.cdiv(n, pair.block_m), ONE_EXP=one_exp, K_BOUNDED=bounded, DIAGONAL=True,
            )  # fmt: skip
        pos_args = (x, y, rho, kappa, pos_row, pos_w, identity, s)
        info_nce = _info_nce_value(row_acc, col_acc, one_exp, s2, diag2, pos_args, lo, ranks)
        # The symmetric terms: with gradients wanted, one pass builds them (their largest logit is the
        # diagonal's 0, a known offset) and keeps ((W + W^T) x)_i and its row masses for the backward.
        ctx.kept = []
        sums = [lz2_xy * LN2]
        for a, sq in ((x, u), (y, v)):
            a0, a1 = ranks.triangle(a.shape[0], tiles.block_m)  # this rank's share of the upper triangle
            if eager:
                grad, _, mass, _, dot, total = kernel_term_sums(
                    tiles, a[a0:a1], a[a0:], sq[a0:a1], sq[a0:], inv_s2, 0.0, 1.0, True, ctx.needs_input_grad[3],
                    True, rows, torch.float32,
                )  # fmt: skip
                ctx.kept.append((_rows_from(grad, a0), _rows_from(mass, a0), dot))
                # The symmetric strips visit half the pairs, hence + log 2; the weights exp(l - 0) <= 1 add up.
                sums.append(ranks.sum_(total).log() + LOG2)
            else:
                parts = [
                    tiles.kernel_lse(
                        a[r0 : min(r0 + rows, a1)], a[r0:], sq[r0 : min(r0 + rows, a1)], sq[r0:], inv_s2, True, bounded
                    )
                    for r0 in range(a0, a1, rows)
                ]
                local = torch.logsumexp(torch.stack(parts), 0) if parts else _minus_inf(x)
                sums.append(ranks.logsumexp(local) + LOG2)
        log_z = torch.stack(sums)  # log-sums over all pairs: XY, XX, YY
        cs = log_z[1] + log_z[2] - 2.0 * log_z[0]  # the log(N M) normalisers cancel
        ctx.save_for_backward(x, y, rho, kappa, u, v, row_lse2, col_lse2, pos_row, pos_w, log_z, lz2_xy)
        ctx.identity, ctx.ranks, ctx.share = identity, ranks, (lo, hi)
        ctx.scale, ctx.inv_s2, ctx.sigma, ctx.tiles, ctx.rows = s, inv_s2, sigma_f, tile_set, rows
        return info_nce, cs

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g_nce: Tensor, g_cs: Tensor) -> tuple[Tensor | None, ...]:
        x, y, rho, kappa, u, v, row_lse2, col_lse2, pos_row, pos_w, log_z, lz2_xy = ctx.saved_tensors
        s, inv_s2, (tiles, _, pair), rows = ctx.scale, ctx.inv_s2, ctx.tiles, ctx.rows
        scalars = torch.cat([g_nce.reshape(1), g_cs.reshape(1), log_z[1:], lz2_xy.reshape(1)])
        gn, gc, lz_xx, lz_yy, lz2 = scalars.tolist()  # one sync
        n, m = x.shape[0], y.shape[0]
        want_sigma = ctx.needs_input_grad[3]
        dots = torch.zeros(4, dtype=torch.float32, device=x.device)  # sum G l, sum W k for XY, XX, YY
        # The symmetric terms first: taken from an eager forward (and scaled in place), else recomputed
        # with the same offset 0, so that a retained graph's next backward gives the same bits.
        kept, ctx.kept = ctx.kept or [None, None], []
        sym_grads = []
        ranks, (lo, hi) = ctx.ranks, ctx.share
        for slot, (a, sq, lz, k) in enumerate(((x, u, lz_xx, kept[0]), (y, v, lz_yy, kept[1])), start=2):
            if k is None:
                a0, a1 = ranks.triangle(a.shape[0], tiles.block_m)
                grad, _, mass, _, dot, _ = kernel_term_sums(
                    tiles, a[a0:a1], a[a0:], sq[a0:a1], sq[a0:], inv_s2, 0.0, 1.0, True, want_sigma, False, rows,
                    torch.float32,
                )  # fmt: skip
                grad, mass = _rows_from(grad, a0), _rows_from(mass, a0)
            else:
                grad, mass, dot = k
            # dD_CS/dl = g_cs, dl/d(x_i.x_j) = 1/sigma^2, x2 for W + W^T; the weights were exp(l - 0).
            factor = 2.0 * inv_s2 * gc * math.exp(-lz)
            # grad is scaled by the first X Y^T GEMM on it (beta) and its masses join the X Y^T
            # strips' in one last pass (`_finish_grad`): no extra (N, D) passes for these terms.
            sym_grads.append((grad, mass * factor, factor))
            dots[slot] = dot * factor
        (dx, x_mass, fx), (dy, y_mass, fy) = sym_grads  # float32 accumulators for the X Y^T strips below
        if ranks.world > 1:  # rows outside this rank's X Y^T strips never meet a GEMM's beta
            dx.mul_(fx)
            dy.mul_(fy)
            fx = fy = 1.0
        work = strip_dtype(x.dtype)
        xg, yg = x.to(work), y.to(work)  # GEMM operands in the strips' dtype (no copy for bf16/fp32)
        # Per-row and per-column vectors of the strip kernel (base-2 logits, see _pair_grad_tile).
        w_row, w_col, g_k = 0.5 * gn / n, 0.5 * gn / m, -2.0 * gc
        one_exp = s <= MAX_ONE_EXP_SCALE
        s2 = s * LOG2E
        if one_exp:  # exp(l - r) = 2^(t) / sum_j 2^(t_j), t the kernel's offset base-2 logit
            row_a, col_b = w_row * torch.exp2(-row_lse2), w_col * torch.exp2(-col_lse2)
        else:
            row_a, col_b = row_lse2, col_lse2
        # The kernel weights exp(l - log_z) = 2^(log2(e) l - lz2), with the forward's own lz2 (exactly
        # the offset its logits were summed under); g_k / sigma^2 multiplies in-kernel (k_scale).
        k_off2, k_scale = -lz2, g_k * inv_s2
        r2, u2, v2 = rho * s2, u * LOG2E, v * LOG2E  # the forward's vectors: the same logits
        pw = (pos_w * gn).float().contiguous()
        pos32 = pos_row.to(torch.int32)
        for r0 in range(lo, hi, rows):
            r1 = min(r0 + rows, hi)
            local = torch.where((pos32 >= r0) & (pos32 < r1), pos32 - r0, -1)
            h, r_mass, c_mass, d = _pair_grad(
                pair, x[r0:r1], y, r2[r0:r1], rho[r0:r1], kappa, u2[r0:r1], v2, row_a[r0 - lo : r1 - lo], col_b, local,
                pw,
                (s, s2, inv_s2 * LOG2E, k_off2, k_scale, w_row, w_col, r0), one_exp, want_sigma,
                ctx.identity,
            )  # fmt: skip
            mm_accumulate(dx[r0:r1], h, yg, beta=fx)  # each row block of dx meets one strip
            mm_accumulate(dy, h.T, xg[r0:r1], beta=fy if r0 == lo else 1.0)
            x_mass[r0:r1] += r_mass
            y_mass += c_mass
            dots[:2] += d
        dots[1] *= g_k  # the strips summed exp(l - log_z) l
        ranks.sum_(dots)  # the scalars' gradients: whole on every rank
        d_scale = dots[0] / s if ctx.needs_input_grad[2] else None  # logits are linear in the scale
        # dk/dsigma = -2 k / sigma; the symmetric sums cover half the pairs and carry 2 / sigma^2 (x2 / x1/(2/s2)).
        d_sigma = (dots[1] + (dots[2] + dots[3]) / inv_s2) * (-2.0 / ctx.sigma) if ctx.needs_input_grad[3] else None
        # Sharded: world x this rank's share, what all_gather_with_grad's backward sums over ranks.
        dx, dy = _finish_grad(dx, x_mass, x, ranks.world), _finish_grad(dy, y_mass, y, ranks.world)
        return dx, dy, d_scale, d_sigma, None, None, None, None, None, None, None


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
    scalars: tuple[float, ...],
    one_exp: bool,
    want_sigma: bool,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One strip: H (S, M) in the strip dtype, row and column corrections R, C, and (sum G l, sum w k)
    with w = exp(k - log_z) the kernel weights before their factor g_k.

    Positives: pos_row[j] is column j's strip-local positive row or -1; with `diagonal` it is
    j - r0 (r0, the strip's first row, is the last of `scalars`), and square tiles take them from
    the diagonal tiles alone."""
    n_tm, n_tn = tiles._tiles(x, y)
    h = torch.empty((x.shape[0], y.shape[0]), dtype=strip_dtype(x.dtype), device=x.device)
    row_part = torch.empty((n_tn, x.shape[0]), dtype=torch.float32, device=x.device)
    col_part = torch.empty((n_tm, y.shape[0]), dtype=torch.float32, device=x.device)
    dots = torch.empty((n_tm * n_tn, 2), dtype=torch.float32, device=x.device)
    h_arg, store_tma = tiles._out_operand(h, x, y)
    args = (r2, rho, kappa, u2, v2, row_a, col_b, pos_row, pos_w, h_arg, row_part, col_part, dots)

    def launch(positives: int, n_tiles: int | None = None) -> None:
        tiles._launch(
            _pair_grad_kernel, x, y, *args, scalars=scalars, n_tiles=n_tiles, ONE_EXP=one_exp,
            WANT_SIGMA=want_sigma, STORE_TMA=store_tma, POSITIVES=positives,
        )  # fmt: skip

    r0 = int(scalars[-1])
    if diagonal and r0 + x.shape[0] > y.shape[0]:
        raise ValueError(f"diagonal positives need the strip's rows {r0}..{r0 + x.shape[0]} within y's {y.shape[0]}")
    if diagonal and tiles.block_m == tiles.block_n and r0 % tiles.block_m == 0:
        launch(0)  # every tile, without positives
        launch(1, n_tiles=n_tm)  # the diagonal tiles again, with their positives
    else:
        launch(2)
    return h, row_part.sum(0), col_part.sum(0), dots.sum(0)


def _info_nce_value(
    row_acc: Tensor,
    col_acc: Tensor,
    one_exp: bool,
    s2: float,
    diag2: Tensor | None,
    positives_of: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float],
    lo: int,
    ranks: _Ranks,
) -> Tensor:
    """InfoNCE's value from the forward's row and column accumulators (one_exp: float32 sums of 2^t,
    t = log2(e) l - s2; else log2-sum-exp2s of log2(e) l), in float64 on (N,) vectors.

    With diag2 (each row's and column's positive logit t_ii, the float32 the tiles exponentiated)
    the loss is mean log2(sum_j 2^(t_ij)) - t_ii per row and column: the positive's own rounding
    cancels and a loss near 0 keeps ~1e-7 absolute precision (one_exp), as dense float32 does by
    offsetting with the row maximum. Otherwise (captions mapped by text_to_image) the positives'
    logits come from a float32 dot on the host, which differs from the tiles' by ~1e-7 s.

    Sharded, row_acc holds this rank's rows from `lo` on (their sum is all-reduced) and col_acc the
    columns' totals over all ranks."""
    f64 = torch.float64
    x, y, rho, kappa, pos_row, pos_w, identity, s = positives_of
    n = x.shape[0]
    r, c = row_acc.to(f64), col_acc.to(f64)
    if one_exp:
        r, c = r.log2(), c.log2()
    if diag2 is not None:
        d = diag2.to(f64)
        row_sum = ranks.sum_((r - d[lo : lo + r.shape[0]]).sum())
        return ((0.5 * row_sum / n + 0.5 * (c - d).mean()) * LN2).float()
    pos_logit = positive_dots(x, y, pos_row, identity).to(f64) * rho[pos_row].to(f64) * kappa.to(f64) * s
    offset2 = s2 if one_exp else 0.0
    lse = 0.5 * ranks.sum_(r.sum()) / n + 0.5 * c.mean()
    return ((lse + offset2) * LN2 - (pos_w.to(f64) * pos_logit).sum()).float()


class _Ranks:
    """The ranks that share one fused loss (`fused_infonce_cs(group=...)`), or (group None) this process.

    Every rank holds the same global batch; rank r takes rows [lo, hi) of X Y^T and a balanced
    share of the upper triangles of X X^T and Y Y^T (tile-aligned, as `sharded` splits them), and the
    ranks add their column sums, log-sums and the scalars' gradients. One process: no collectives."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        on = group is not None and dist.is_available() and dist.is_initialized()  # None: this process alone
        self.group = group
        self.world = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0

    def share(self, n: int, align: int) -> tuple[int, int]:
        """Rows [lo, hi) of n, starting on multiples of `align` (the strips' tiles)."""
        from csaligner.kernels.sharded import share

        return share(n, self.rank, self.world, align)

    def triangle(self, n: int, align: int) -> tuple[int, int]:
        from csaligner.kernels.sharded import triangle_share

        return triangle_share(n, self.rank, self.world, align)

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over the ranks, in place (float32 or float64)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    def logsumexp(self, t: Tensor, base2: bool = False) -> Tensor:
        """Elementwise log-sum-exp (base 2: log2-sum-exp2) of t over the ranks; -inf everywhere stays -inf."""
        if self.world == 1:
            return t
        from csaligner.kernels.sharded import all_logsumexp

        return all_logsumexp(t, self.group, base2)


def _minus_inf(like: Tensor) -> Tensor:
    return torch.full((), -math.inf, dtype=torch.float32, device=like.device)


def _rows_from(t: Tensor, a0: int) -> Tensor:
    """t (the rows from a0 on) as the whole: zeros before a0 (a rank's symmetric share)."""
    if a0 == 0:
        return t
    out = torch.zeros((a0 + t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[a0:] = t
    return out


def _logsumexp2(p: Tensor, dim: int) -> Tensor:
    """log2 sum 2^p along dim (all -inf gives -inf)."""
    m = p.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.exp2(p - m).sum(dim, keepdim=True).log2()).squeeze(dim)


def _norm_terms(a: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) 1 / max(|a_i|, 1e-12) (as F.normalize divides) and |a_i|^2 / 2, float32, from one pass
    over a (one float32 copy of a at a time)."""
    half_sq = _half_sq_norms(a, torch.float32)
    return (2.0 * half_sq).sqrt().clamp_min_(1e-12).reciprocal_(), half_sq


def fused_infonce_cs(
    x: Tensor,
    y: Tensor,
    temperature: float | Tensor,
    sigma: float | Tensor,
    text_to_image: Tensor | None = None,
    *,
    tiles: TritonStrips | None = None,
    pair_tiles: TritonStrips | None = None,
    forward_tiles: TritonStrips | None = None,
    chunk_size: int,
    group: Any = None,
) -> tuple[Tensor, Tensor]:
    """InfoNCE(x, y) and D_CS(x, y) with one Gram pass per product; equal to the dense pair.

    Args:
        x: (N, D) image features (InfoNCE normalises them; D_CS takes them as they are, so pass
            unit-norm features for the CS-Aligner objective).
        y: (M, D) text features; M == N unless text_to_image is given.
        temperature, sigma: > 0, floats or 0-dim tensors (learnable ones get gradients).
        text_to_image: optional (M,) image row of each text.
        tiles: tile configuration of every kernel unless the two below are given; without any,
            each kernel takes its measured default (`SYMMETRIC_TILES` for X X^T and Y Y^T,
            `FORWARD_PAIR_TILES` and `BACKWARD_PAIR_TILES` for X Y^T).
        pair_tiles: tile configuration of the two X Y^T kernels (default: `tiles`).
        forward_tiles: tile configuration of the forward X Y^T kernel (default: `pair_tiles`).
        chunk_size: rows per strip, a multiple of every configuration's block_m.
        group: a torch.distributed process group (e.g. `dist.group.WORLD`) of several ranks: x and y are the
            global batch, the same on every rank (`all_gather_with_grad`): each rank computes its
            share of the rows of X Y^T and of the triangles of X X^T and Y Y^T, the ranks add O(M)
            statistics, and the gradients come back as world_size x this rank's share (the
            convention of `csaligner.kernels.sharded`). None (the default): this process alone, even
            under an initialised process group.

    Returns:
        (info_nce, cs) float32 scalars; gradients come back in the inputs' dtype.
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    check_positive("temperature", temperature)
    check_positive("sigma", sigma)
    if x.dtype == torch.float64 or y.dtype == torch.float64:
        raise ValueError("the fused Triton path computes in float32; use impl='chunked' for float64 inputs")
    sym = tiles or SYMMETRIC_TILES
    back = pair_tiles or tiles or BACKWARD_PAIR_TILES
    fwd = forward_tiles or pair_tiles or tiles or FORWARD_PAIR_TILES
    for t in (sym, fwd, back):
        if chunk_size % t.block_m:
            raise ValueError(f"chunk_size must be a multiple of the tile size {t.block_m}, got {chunk_size}")
    pos_row, pos_w = positives(x.shape[0], y.shape[0], text_to_image, x.device, torch.float32)
    dtype = x.dtype if x.dtype == y.dtype else torch.float32
    scale = 1.0 / _as_tensor(temperature, torch.float32, x.device)
    sig = _as_tensor(sigma, torch.float32, x.device)
    eager = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    out: tuple[Tensor, Tensor] = _PairedInfoNCECS.apply(
        x.to(dtype).contiguous(),
        y.to(dtype).contiguous(),
        scale,
        sig,
        pos_row,
        pos_w,
        (sym, fwd, back),
        chunk_size,
        eager,
        text_to_image is None,  # positives on the diagonal
        _Ranks(group),
    )
    return out
