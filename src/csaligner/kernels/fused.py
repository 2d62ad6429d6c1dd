"""InfoNCE + D_CS in one pass over the shared Gram matrix X Y^T (Triton; CUDA or the interpreter).

When the CS pools are the paired features themselves (no unpaired extras), InfoNCE's logits
s * x_i.y_j / (|x_i| |y_j|) and the cross kernel's logits -|x_i - y_j|^2 / (2 sigma^2) are two
elementwise maps of the same dot products. `fused_infonce_cs` computes that Gram tile once:

* forward: one kernel gives InfoNCE's row and column log-sum-exp partials and the cross kernel's
  log-sum-exp partial from each tile; the symmetric X X^T and Y Y^T terms use the strip kernels of
  `triton_kernels` (upper triangle only). When the features need gradients these write their
  weight strips right away (offset 0, the diagonal's logit) and keep the (N, D) gradients, so the
  backward pass does not sweep X X^T and Y Y^T again (see `chunked.kernel_term_grads`).
* backward: one kernel writes a single weight strip H = s rho_i kappa_j G_ij + W_ij / sigma^2
  (G: InfoNCE's dL/dlogit, W: the kernel weights, rho/kappa: inverse norms) in bfloat16 for half
  inputs, plus per-row and per-column corrections. Two cuBLAS GEMMs apply it:

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
    kernel_term_grads,
    mm_accumulate,
    positives,
)
from csaligner.kernels.triton_kernels import TritonStrips, _dot_tile, _lse, _tile_span, strip_dtype

MAX_ONE_EXP_SCALE = MAX_BOUNDED_NATS / 2
"""Up to this InfoNCE scale (temperature >= 0.025) all logits of a tile lie within 2 * scale <= 80
nats of each other, so one exp per logit with a shared offset stays inside float32's range."""


@triton.jit
def _pair_logits(
    X, Y, RHO, KAPPA, U, V, tm, tn, n_a, n_b, dim, scale, inv_s2,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """InfoNCE logits s * rho_i kappa_j x_i.y_j and kernel logits min(0, x.y / sigma^2 + u_i + v_j)."""
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    dot = _dot_tile(X, Y, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA)
    rho = tl.load(RHO + rows, mask=rows < n_a, other=0.0) * scale
    kappa = tl.load(KAPPA + cols, mask=cols < n_b, other=0.0)
    u = tl.load(U + rows, mask=rows < n_a, other=0.0)
    v = tl.load(V + cols, mask=cols < n_b, other=0.0)
    return dot * rho[:, None] * kappa[None, :], tl.minimum(dot * inv_s2 + u[:, None] + v[None, :], 0.0)


@triton.jit
def _pair_lse_tile(
    pid,
    X, Y, RHO, KAPPA, U, V, ROW_PART, COL_PART, K_PART,
    n_a, n_b, dim, scale, inv_s2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, BRANCHLESS: tl.constexpr,
    ONE_EXP: tl.constexpr, K_BOUNDED: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    logit, klogit = _pair_logits(
        X, Y, RHO, KAPPA, U, V, tm, tn, n_a, n_b, dim, scale, inv_s2, BM, BN, BK, PREC, UPCAST, TMA
    )
    valid = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    if BRANCHLESS:  # noqa: SIM114 (persistent loop body: mask everywhere rather than branch)
        logit = tl.where(valid, logit, float("-inf"))
        klogit = tl.where(valid, klogit, float("-inf"))
    elif (tm + 1) * BM > n_a or (tn + 1) * BN > n_b:  # edge tile: mask the padding (interior tiles skip this)
        logit = tl.where(valid, logit, float("-inf"))
        klogit = tl.where(valid, klogit, float("-inf"))
    if ONE_EXP:  # |logit| <= scale <= 40 (unit vectors): one exp per logit, offset by the bound, no max
        e = tl.exp(logit - scale)
        r_sum = tl.sum(e, 1)
        c_sum = tl.sum(e, 0)
        r_lse = tl.where(r_sum > 0, scale + tl.log(tl.where(r_sum > 0, r_sum, 1.0)), float("-inf"))
        c_lse = tl.where(c_sum > 0, scale + tl.log(tl.where(c_sum > 0, c_sum, 1.0)), float("-inf"))
    else:
        r_lse = _lse(logit, 1)
        c_lse = _lse(logit, 0)
    tl.store(ROW_PART + tn * n_a + rows, r_lse, mask=rows < n_a)
    tl.store(COL_PART + tm * n_b + cols, c_lse, mask=cols < n_b)
    if K_BOUNDED:  # every kernel logit lies in [-80, 0]: sum exp directly, no max
        k_sum = tl.sum(tl.sum(tl.exp(klogit), 1), 0)
        k_lse = tl.where(k_sum > 0, tl.log(tl.where(k_sum > 0, k_sum, 1.0)), float("-inf"))
    else:
        k_lse = _lse(tl.reshape(klogit, (BM * BN,)), 0)
    tl.store(K_PART + tm * n_tn + tn, k_lse)


@triton.jit
def _pair_lse_kernel(
    X, Y, RHO, KAPPA, U, V, ROW_PART, COL_PART, K_PART,
    n_a, n_b, dim, scale, inv_s2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr,
    ONE_EXP: tl.constexpr, K_BOUNDED: tl.constexpr,
):  # fmt: skip
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _pair_lse_tile(pid, X, Y, RHO, KAPPA, U, V, ROW_PART, COL_PART, K_PART, n_a, n_b, dim, scale, inv_s2,
                n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, FLATTEN, ONE_EXP, K_BOUNDED)  # fmt: skip
    else:
        _pair_lse_tile(tl.program_id(0), X, Y, RHO, KAPPA, U, V, ROW_PART, COL_PART, K_PART, n_a, n_b, dim, scale,
            inv_s2, n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, FLATTEN, ONE_EXP, K_BOUNDED)  # fmt: skip


@triton.jit
def _pair_grad_tile(
    pid,
    X, Y, RHO, KAPPA, U, V, ROW_LSE, COL_LSE, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART,
    n_a, n_b, dim, scale, inv_s2, log_z, g_k, w_row, w_col, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, BRANCHLESS: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    logit, klogit = _pair_logits(
        X, Y, RHO, KAPPA, U, V, tm, tn, n_a, n_b, dim, scale, inv_s2, BM, BN, BK, PREC, UPCAST, TMA
    )
    r_lse = tl.load(ROW_LSE + rows, mask=rows < n_a, other=0.0)
    c_lse = tl.load(COL_LSE + cols, mask=cols < n_b, other=0.0)
    if ONE_EXP:  # exp(l - r) = exp(l - s) exp(s - r); both factors in range for s <= 40
        g = tl.exp(logit - scale) * (w_row * tl.exp(scale - r_lse)[:, None] + w_col * tl.exp(scale - c_lse)[None, :])
    else:
        g = w_row * tl.exp(logit - r_lse[:, None]) + w_col * tl.exp(logit - c_lse[None, :])
    pos_row = tl.load(POS_ROW + cols, mask=cols < n_b, other=-1)
    w = g_k * tl.exp(klogit - log_z)
    valid = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    if BRANCHLESS:  # a persistent loop body without branches: fold positives and padding in everywhere
        g = tl.where(
            valid,
            g
            - tl.where(
                rows[:, None] == pos_row[None, :], tl.load(POS_W + cols, mask=cols < n_b, other=0.0)[None, :], 0.0
            ),
            0.0,
        )
        w = tl.where(valid, w, 0.0)
    else:
        if tl.max(((pos_row >= tm * BM) & (pos_row < tm * BM + BM)).to(tl.int32), 0) > 0:  # tile holds positives
            pos_w = tl.load(POS_W + cols, mask=cols < n_b, other=0.0)
            g -= tl.where(rows[:, None] == pos_row[None, :], pos_w[None, :], 0.0)
        if (tm + 1) * BM > n_a or (tn + 1) * BN > n_b:  # edge tile: zero the padding
            g = tl.where(valid, g, 0.0)
            w = tl.where(valid, w, 0.0)
    rho = tl.load(RHO + rows, mask=rows < n_a, other=0.0)
    kappa = tl.load(KAPPA + cols, mask=cols < n_b, other=0.0)
    nce = g * (scale * rho)[:, None] * kappa[None, :]  # dL/d(x_i.y_j) from InfoNCE
    stored = (nce + inv_s2 * w).to(H.dtype.element_ty)
    tl.store(H + rows[:, None] * n_b + cols[None, :], stored, mask=(rows[:, None] < n_a) & (cols[None, :] < n_b))
    resid = stored.to(tl.float32) - nce  # the kernel mass as stored, rounding included
    gl = g * logit
    tl.store(ROW_PART + tn * n_a + rows, tl.sum(resid, 1) + rho * rho * tl.sum(gl, 1), mask=rows < n_a)
    tl.store(COL_PART + tm * n_b + cols, tl.sum(resid, 0) + kappa * kappa * tl.sum(gl, 0), mask=cols < n_b)
    tl.store(DOT_PART + 2 * (tm * n_tn + tn), tl.sum(tl.sum(gl, 1), 0))
    if WANT_SIGMA:
        tl.store(DOT_PART + 2 * (tm * n_tn + tn) + 1, tl.sum(tl.sum(w * klogit, 1), 0))
    else:
        tl.store(DOT_PART + 2 * (tm * n_tn + tn) + 1, 0.0)


@triton.jit
def _pair_grad_kernel(
    X, Y, RHO, KAPPA, U, V, ROW_LSE, COL_LSE, POS_ROW, POS_W, H, ROW_PART, COL_PART, DOT_PART,
    n_a, n_b, dim, scale, inv_s2, log_z, g_k, w_row, w_col, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr,
    ONE_EXP: tl.constexpr, WANT_SIGMA: tl.constexpr,
):  # fmt: skip
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _pair_grad_tile(pid, X, Y, RHO, KAPPA, U, V, ROW_LSE, COL_LSE, POS_ROW, POS_W, H, ROW_PART, COL_PART,
                DOT_PART, n_a, n_b, dim, scale, inv_s2, log_z, g_k, w_row, w_col, n_tm, n_tn, BM, BN, BK, GROUP_M,
                PREC, UPCAST, TMA, FLATTEN, ONE_EXP, WANT_SIGMA)  # fmt: skip
    else:
        _pair_grad_tile(tl.program_id(0), X, Y, RHO, KAPPA, U, V, ROW_LSE, COL_LSE, POS_ROW, POS_W, H, ROW_PART,
            COL_PART, DOT_PART, n_a, n_b, dim, scale, inv_s2, log_z, g_k, w_row, w_col, n_tm, n_tn, BM, BN, BK,
            GROUP_M, PREC, UPCAST, TMA, FLATTEN, ONE_EXP, WANT_SIGMA)  # fmt: skip


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
        tile_pair: tuple[TritonStrips, TritonStrips],
        rows: int,
        eager: bool,
    ) -> tuple[Tensor, Tensor]:
        s, inv_s2 = float(scale), 1.0 / float(sigma) ** 2
        n, m = x.shape[0], y.shape[0]
        tiles, pair = tile_pair
        (rho, u), (kappa, v) = _norm_terms(x, inv_s2), _norm_terms(y, inv_s2)
        row_lse = torch.empty(n, dtype=torch.float32, device=x.device)
        col_lse = torch.full((m,), -math.inf, dtype=torch.float32, device=x.device)
        k_parts = []
        # Kernel logits >= -(|x| + |y|)^2 / (2 sigma^2): when that is >= -80, tiles need no max.
        bounded = float(1 / rho.min() + 1 / kappa.min()) ** 2 * inv_s2 / 2 <= MAX_BOUNDED_NATS
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            n_tm, n_tn = pair._tiles(x[r0:r1], y)
            row_part = torch.empty((n_tn, r1 - r0), dtype=torch.float32, device=x.device)
            col_part = torch.empty((n_tm, m), dtype=torch.float32, device=x.device)
            k_part = torch.empty(n_tm * n_tn, dtype=torch.float32, device=x.device)
            pair._launch(
                _pair_lse_kernel, x[r0:r1], y, rho[r0:r1], kappa, u[r0:r1], v, row_part, col_part, k_part,
                scalars=(s, inv_s2), ONE_EXP=s <= MAX_ONE_EXP_SCALE, K_BOUNDED=bounded,
            )  # fmt: skip
            row_lse[r0:r1] = torch.logsumexp(row_part, 0)
            torch.logaddexp(col_lse, torch.logsumexp(col_part, 0), out=col_lse)
            k_parts.append(torch.logsumexp(k_part, 0))
        # The symmetric terms: with gradients wanted, one pass builds them (their largest logit is the
        # diagonal's 0, a known offset) and keeps sum_j (W + W^T)_ij (x_j - x_i) for the backward.
        ctx.kept = []
        sums = [torch.logsumexp(torch.stack(k_parts), 0)]
        for a, sq in ((x, u), (y, v)):
            if eager:
                grad, _, dot, total = kernel_term_grads(
                    tiles, a, a, sq, sq, inv_s2, 0.0, 1.0, True, ctx.needs_input_grad[3], True, rows, torch.float32
                )
                ctx.kept.append((grad, dot))
                sums.append(total.log() + LOG2)  # the symmetric strips visit half the pairs, hence + log 2
            else:
                parts = [
                    tiles.kernel_lse(a[r0 : r0 + rows], a[r0:], sq[r0 : r0 + rows], sq[r0:], inv_s2, True, bounded)
                    for r0 in range(0, a.shape[0], rows)
                ]
                sums.append(torch.logsumexp(torch.stack(parts), 0) + LOG2)
        log_z = torch.stack(sums)  # log-sums over all pairs: XY, XX, YY
        pos_logit = _positive_dots(x, y, pos_row) * rho[pos_row] * kappa * s
        info_nce = 0.5 * row_lse.mean() + 0.5 * col_lse.mean() - (pos_w * pos_logit).sum()
        cs = log_z[1] + log_z[2] - 2.0 * log_z[0]  # the log(N M) normalisers cancel
        ctx.save_for_backward(x, y, rho, kappa, u, v, row_lse, col_lse, pos_row, pos_w, log_z)
        ctx.scale, ctx.inv_s2, ctx.sigma, ctx.tiles, ctx.rows = s, inv_s2, float(sigma), tile_pair, rows
        return info_nce, cs

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g_nce: Tensor, g_cs: Tensor) -> tuple[Tensor | None, ...]:
        x, y, rho, kappa, u, v, row_lse, col_lse, pos_row, pos_w, log_z = ctx.saved_tensors
        s, inv_s2, (tiles, pair), rows = ctx.scale, ctx.inv_s2, ctx.tiles, ctx.rows
        gn, gc = float(g_nce), float(g_cs)
        lz_xy, lz_xx, lz_yy = (float(t) for t in log_z)
        n, m = x.shape[0], y.shape[0]
        want_sigma = ctx.needs_input_grad[3]
        dots = torch.zeros(4, dtype=torch.float32, device=x.device)  # sum G l, sum W k for XY, XX, YY
        # The symmetric terms first: taken from an eager forward (and scaled in place), else recomputed
        # with the same offset 0, so that a retained graph's next backward gives the same bits.
        kept, ctx.kept = ctx.kept or [None, None], []
        sym_grads = []
        for slot, (a, sq, lz, k) in enumerate(((x, u, lz_xx, kept[0]), (y, v, lz_yy, kept[1])), start=2):
            if k is None:
                grad, _, dot, _ = kernel_term_grads(
                    tiles, a, a, sq, sq, inv_s2, 0.0, 1.0, True, want_sigma, False, rows, torch.float32
                )
            else:
                grad, dot = k
            # dD_CS/dl = g_cs, dl/d(x_i.x_j) = 1/sigma^2, x2 for W + W^T; the weights were exp(l - 0).
            factor = 2.0 * inv_s2 * gc * math.exp(-lz)
            sym_grads.append(grad.mul_(factor))
            dots[slot] = dot * factor
        dx, dy = sym_grads  # float32 accumulators for the X Y^T strips below
        work = strip_dtype(x.dtype)
        xg, yg = x.to(work), y.to(work)  # GEMM operands in the strips' dtype (no copy for bf16/fp32)
        x_mass = torch.zeros(n, dtype=torch.float32, device=x.device)
        y_mass = torch.zeros(m, dtype=torch.float32, device=x.device)
        pw = (pos_w * gn).float().contiguous()
        pos32 = pos_row.to(torch.int32)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            local = torch.where((pos32 >= r0) & (pos32 < r1), pos32 - r0, -1)
            h, r_mass, c_mass, d = _pair_grad(
                pair, x[r0:r1], y, rho[r0:r1], kappa, u[r0:r1], v, row_lse[r0:r1], col_lse, local, pw,
                (s, inv_s2, lz_xy, -2.0 * gc, 0.5 * gn / n, 0.5 * gn / m), want_sigma,
            )  # fmt: skip
            mm_accumulate(dx[r0:r1], h, yg)
            mm_accumulate(dy, h.T, xg[r0:r1])
            x_mass[r0:r1] += r_mass
            y_mass += c_mass
            dots[:2] += d
        dx.addcmul_(x_mass.unsqueeze(1), x, value=-1.0)
        dy.addcmul_(y_mass.unsqueeze(1), y, value=-1.0)
        d_scale = dots[0] / s if ctx.needs_input_grad[2] else None  # logits are linear in the scale
        # dk/dsigma = -2 k / sigma; the symmetric sums cover half the pairs and carry 2 / sigma^2 (x2 / x1/(2/s2)).
        d_sigma = (dots[1] + (dots[2] + dots[3]) / inv_s2) * (-2.0 / ctx.sigma) if ctx.needs_input_grad[3] else None
        return dx.to(x.dtype), dy.to(y.dtype), d_scale, d_sigma, None, None, None, None, None


def _pair_grad(
    tiles: TritonStrips,
    x: Tensor,
    y: Tensor,
    rho: Tensor,
    kappa: Tensor,
    u: Tensor,
    v: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    pos_row: Tensor,
    pos_w: Tensor,
    scalars: tuple[float, ...],
    want_sigma: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One strip: H (S, M) in the strip dtype, row and column corrections R, C, and (sum G l, sum W k)."""
    n_tm, n_tn = tiles._tiles(x, y)
    h = torch.empty((x.shape[0], y.shape[0]), dtype=strip_dtype(x.dtype), device=x.device)
    row_part = torch.empty((n_tn, x.shape[0]), dtype=torch.float32, device=x.device)
    col_part = torch.empty((n_tm, y.shape[0]), dtype=torch.float32, device=x.device)
    dots = torch.empty((n_tm * n_tn, 2), dtype=torch.float32, device=x.device)
    tiles._launch(
        _pair_grad_kernel, x, y, rho, kappa, u, v, row_lse, col_lse, pos_row, pos_w, h, row_part, col_part, dots,
        scalars=scalars, ONE_EXP=scalars[0] <= MAX_ONE_EXP_SCALE, WANT_SIGMA=want_sigma,
    )  # fmt: skip
    return h, row_part.sum(0), col_part.sum(0), dots.sum(0)


def _positive_dots(x: Tensor, y: Tensor, pos_row: Tensor, rows: int = 8192) -> Tensor:
    """(M,) x[pos_row[j]] . y_j in float32, a few thousand rows at a time (no (M, D) float32 copies)."""
    out = torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
    for r0 in range(0, y.shape[0], rows):
        sl = slice(r0, r0 + rows)
        out[sl] = (x[pos_row[sl]].float() * y[sl].float()).sum(1)
    return out


def _norm_terms(a: Tensor, inv_s2: float) -> tuple[Tensor, Tensor]:
    """(N,) 1 / max(|a_i|, 1e-12) (as F.normalize divides) and -|a_i|^2 / (2 sigma^2), float32,
    from one pass over a (one float32 copy of a at a time)."""
    half_sq = _half_sq_norms(a, torch.float32)
    return (2.0 * half_sq).sqrt_().clamp_min_(1e-12).reciprocal_(), half_sq * -inv_s2


def fused_infonce_cs(
    x: Tensor,
    y: Tensor,
    temperature: float | Tensor,
    sigma: float | Tensor,
    text_to_image: Tensor | None = None,
    *,
    tiles: TritonStrips | None = None,
    pair_tiles: TritonStrips | None = None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """InfoNCE(x, y) and D_CS(x, y) with one Gram pass per product; equal to the dense pair.

    Args:
        x: (N, D) image features (InfoNCE normalises them; D_CS takes them as they are, so pass
            unit-norm features for the CS-Aligner objective).
        y: (M, D) text features; M == N unless text_to_image is given.
        temperature, sigma: > 0, floats or 0-dim tensors (learnable ones get gradients).
        text_to_image: optional (M,) image row of each text.
        tiles: tile configuration (default `TritonStrips()`).
        pair_tiles: tile configuration of the two X Y^T kernels (default: `tiles`); its block_m
            must divide chunk_size.
        chunk_size: rows per strip, a multiple of the tile size.

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
    tiles = tiles or TritonStrips()
    pair_tiles = pair_tiles or tiles
    for t in (tiles, pair_tiles):
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
        (tiles, pair_tiles),
        chunk_size,
        eager,
    )
    return out
