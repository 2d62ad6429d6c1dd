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
from torch import Tensor

from csaligner._validation import (
    check_features,
    check_positive,
    check_positive_value,
    check_same_dim,
    checks_finite_once,
    needs_finite_check,
    non_finite_error,
    record_finite,
)
from csaligner.kernels.chunked import kernel_term_sums
from csaligner.kernels.fused_kernels import (
    FORWARD_PAIR_TILES,
    MAX_ONE_EXP_SCALE,
    _finish_grad,
    _pair_grad,
    _pair_lse_kernel,
    backward_pair_tiles,
    symmetric_tiles,
)
from csaligner.kernels.nce import positive_dots, positives
from csaligner.kernels.sharded import Ranks
from csaligner.kernels.strips import (
    LOG2,
    MAX_BOUNDED_NATS,
    HostRead,
    as_tensor,
    autocast_off,
    half_sq_norms,
    mm_accumulate,
)
from csaligner.kernels.triton_kernels import LN2, LOG2E
from csaligner.kernels.triton_strips import TritonStrips, strip_dtype, sum_partials


class _PairedInfoNCECS(torch.autograd.Function):
    """(InfoNCE, D_CS) of the same features; see the module docstring."""

    @staticmethod
    @autocast_off
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        temperature: Tensor | float,
        sigma: Tensor | float,
        pos_row: Tensor,
        pos_w: Tensor,
        tile_set: tuple[TritonStrips, TritonStrips, TritonStrips],
        rows: int,
        eager: bool,
        identity: bool,
        ranks: Ranks,
        finite: tuple[tuple[str, Tensor], ...],
        shown: tuple[object, object],
    ) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        tiles, pair, _ = tile_set  # symmetric, forward X Y^T (, backward X Y^T)
        lo, hi = ranks.share(n, pair.block_m)  # this rank's rows of X Y^T (all of them in one process)
        (rho, hx), (kappa, hy) = _norm_terms(x), _norm_terms(y)
        # What the host needs to know, in one read: the largest norms (whether kernel tiles need a max),
        # the temperature and sigma when they are tensors, and whether the inputs are finite (`finite`: the
        # caller's checks, folded in here so that they cost no read of their own).
        scalars = [t for t in (temperature, sigma) if isinstance(t, Tensor)]
        flags = [torch.isfinite(t).all() for _, t in finite]
        pending = HostRead(torch.stack([1 / rho.min() + 1 / kappa.min(), *scalars, *flags]))
        # The symmetric terms: with gradients wanted, one pass builds them (their largest logit is the
        # diagonal's 0, a known offset) and keeps ((W + W^T) x)_i and its row masses for the backward.
        # With sigma known on the host, that pass is queued before the read waits (`HostRead`).
        want_sigma = ctx.needs_input_grad[3]

        def symmetric(
            inv_s2: float, u: Tensor, v: Tensor, bounded: bool
        ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor, Tensor]]]:
            sums, kept = [], []
            for a, sq in ((x, u), (y, v)):
                log_sum, k = _symmetric_forward(tiles, a, sq, inv_s2, eager, want_sigma, bounded, rows, ranks)
                sums.append(log_sum)
                if k is not None:
                    kept.append(k)
            return sums, kept

        early = None
        if eager and not isinstance(sigma, Tensor):
            inv_s2 = 1.0 / sigma**2
            u, v = hx * -inv_s2, hy * -inv_s2  # -|a|^2 / (2 sigma^2)
            early = symmetric(inv_s2, u, v, False)
        max_inv_norms, *values = pending.values()
        for (name, t), ok in zip(finite, values[len(scalars) :], strict=True):
            if not ok:
                raise non_finite_error(name, t)  # names the loss's own input when t stands in for it
        read = iter(values)
        temperature_f, sigma_f = (next(read) if isinstance(t, Tensor) else float(t) for t in (temperature, sigma))
        check_positive_value("temperature", temperature_f, shown=shown[0])  # as the caller passed them
        check_positive_value("sigma", sigma_f, shown=shown[1])
        s = 1.0 / temperature_f  # the logit scale, in double as for a float temperature
        if early is None:
            inv_s2 = 1.0 / sigma_f**2
            u, v = hx * -inv_s2, hy * -inv_s2
        s2 = s * LOG2E
        # Kernel logits >= -(|x| + |y|)^2 / (2 sigma^2): when that is >= -80, tiles need no max.
        bounded = max_inv_norms**2 * inv_s2 / 2 <= MAX_BOUNDED_NATS
        sym_sums, ctx.kept = early or symmetric(inv_s2, u, v, bounded)
        one_exp = s <= MAX_ONE_EXP_SCALE  # the InfoNCE partials are sums of 2^(l log2(e) - s2)
        r2, u2, v2 = rho * s2, u * LOG2E, v * LOG2E  # base-2 logits in the kernels
        logits = (x, y, r2, kappa, u2, v2, s2, inv_s2 * LOG2E, one_exp, bounded)
        row_acc, col_acc, lz2_xy = _pair_forward(pair, logits, lo, hi, rows, ranks)
        # The backward's softmax normalisers, base 2; one_exp: log2 of the sums of 2^(t), t = log2(e) l - s2
        # (so without + s2: adding it here and taking it off there would round every softmax at s2's scale).
        row_lse2, col_lse2 = (row_acc.log2(), col_acc.log2()) if one_exp else (row_acc, col_acc)
        # The positives' t_ii as the tiles computed them, when they lie on the diagonal.
        diag2 = _diagonal_logits(pair, logits) if identity and pair.block_m == pair.block_n else None
        pos_args = (x, y, rho, kappa, pos_row, pos_w, identity, s)
        info_nce = _info_nce_value(row_acc, col_acc, one_exp, s2, diag2, pos_args, lo, ranks)
        sums = [lz2_xy * LN2, *sym_sums]
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
        n, m = x.shape[0], y.shape[0]
        gn_t, gc_t = g_nce.reshape(()).float(), g_cs.reshape(()).float()
        # The host needs g_cs and the symmetric log-sums (the GEMMs' beta); it reads them while the
        # GPU runs the work queued below (`HostRead`), so the read leaves no idle gap.
        pending = HostRead(torch.stack([gc_t, log_z[1], log_z[2]]))
        want_sigma = ctx.needs_input_grad[3]
        ranks, (lo, hi) = ctx.ranks, ctx.share
        # The symmetric terms: taken from an eager forward (and scaled below), else recomputed with
        # the same offset 0, so that a retained graph's next backward gives the same bits.
        kept, ctx.kept = ctx.kept or [None, None], []
        kept = [
            k if k is not None else _symmetric_sums(tiles, a, sq, inv_s2, want_sigma, False, rows, ranks)[:3]
            for a, sq, k in ((x, u, kept[0]), (y, v, kept[1]))
        ]
        # The X Y^T strips' device scalars (base-2 logits, see _pair_grad_tile): the kernel weights
        # exp(l - log_z) = 2^(log2(e) l - lz2) with the forward's own lz2 (exactly the offset its
        # logits were summed under), g_k / sigma^2 = -2 g_cs / sigma^2 multiplying them in-kernel, and
        # InfoNCE's row and column weights.
        w_row, w_col = gn_t * (0.5 / n), gn_t * (0.5 / m)
        grad_scalars = torch.stack([-lz2_xy.float(), gc_t * (-2.0 * inv_s2), w_row, w_col]).contiguous()
        one_exp = s <= MAX_ONE_EXP_SCALE
        s2 = s * LOG2E
        if one_exp:  # exp(l - r) = 2^(t) / sum_j 2^(t_j), t the kernel's offset base-2 logit
            row_a, col_b = w_row * torch.exp2(-row_lse2), w_col * torch.exp2(-col_lse2)
        else:
            row_a, col_b = row_lse2, col_lse2
        r2, u2, v2 = rho * s2, u * LOG2E, v * LOG2E  # the forward's vectors: the same logits
        pw = (pos_w * gn_t).float().contiguous()
        pos32 = pos_row.to(torch.int32)

        def strip(r0: int) -> tuple[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
            r1 = min(r0 + rows, hi)
            if ctx.identity and pair.block_m == pair.block_n and r0 % pair.block_m == 0:
                local = pos32  # the diagonal tiles hold the positives; _pair_grad reads no rows (4 launches less)
            else:
                local = torch.where((pos32 >= r0) & (pos32 < r1), pos32 - r0, -1)
            return r1, _pair_grad(
                pair, x[r0:r1], y, r2[r0:r1], rho[r0:r1], kappa, u2[r0:r1], v2, row_a[r0 - lo : r1 - lo], col_b, local,
                pw, (s, s2, inv_s2 * LOG2E, r0), grad_scalars, one_exp, want_sigma, ctx.identity,
            )  # fmt: skip

        first = strip(lo) if lo < hi else None  # queued before the host read
        gc, lz_xx, lz_yy = pending.values()
        dots = torch.zeros(4, dtype=torch.float32, device=x.device)  # sum G l, sum W k for XY, XX, YY
        sym_grads = []
        for slot, ((grad, mass, dot), lz) in enumerate(zip(kept, (lz_xx, lz_yy), strict=True), start=2):
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
        for r0 in range(lo, hi, rows):
            r1, (h, r_mass, c_mass, d) = first if r0 == lo and first is not None else strip(r0)
            first = None  # its strip is freed with the loop's next one
            mm_accumulate(dx[r0:r1], h, yg, beta=fx)  # each row block of dx meets one strip
            mm_accumulate(dy, h.T, xg[r0:r1], beta=fy if r0 == lo else 1.0)
            x_mass[r0:r1] += r_mass
            y_mass += c_mass
            dots[:2] += d
        g_k = -2.0 * gc
        dots[1] *= g_k  # the strips summed exp(l - log_z) l
        ranks.sum_(dots)  # the scalars' gradients: whole on every rank
        # Logits are linear in the scale s = 1 / T: dL/dT = dL/ds * -s^2, dL/ds = dots[0] / s.
        d_temperature = dots[0] * -s if ctx.needs_input_grad[2] else None
        # dk/dsigma = -2 k / sigma; the symmetric sums cover half the pairs and carry 2 / sigma^2 (x2 / x1/(2/s2)).
        d_sigma = (dots[1] + (dots[2] + dots[3]) / inv_s2) * (-2.0 / ctx.sigma) if ctx.needs_input_grad[3] else None
        # Sharded: world x this rank's share, what all_gather_with_grad's backward sums over ranks.
        dx, dy = _finish_grad(dx, x_mass, x, ranks.world), _finish_grad(dy, y_mass, y, ranks.world)
        return dx, dy, d_temperature, d_sigma, None, None, None, None, None, None, None, None, None


def _pair_forward(
    pair: TritonStrips, logits: tuple[Any, ...], lo: int, hi: int, rows: int, ranks: Ranks
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward X Y^T strips over rows lo:hi: (row accumulators (hi - lo,), column accumulators (M,)
    over all ranks, log2 of the cross kernel's sum over all pairs).

    logits = (x, y, r2, kappa, u2, v2, s2, c2, one_exp, bounded), the base-2 vectors and scalars of
    `_pair_logits2`. one_exp: the accumulators are linear sums of 2^t (t <= 0 and >= -2 s2 >= -116:
    no float32 under- or overflow, so the columns add up across strips without logs), else
    log2-sum-exp2s."""
    x, y, r2, kappa, u2, v2, s2, c2, one_exp, bounded = logits
    m = y.shape[0]
    row_acc = torch.empty(hi - lo, dtype=torch.float32, device=x.device)
    col_acc = torch.full((m,), 0.0 if one_exp else -math.inf, dtype=torch.float32, device=x.device)
    k_parts2 = []
    for r0 in range(lo, hi, rows):
        r1 = min(r0 + rows, hi)
        n_tm, n_tn = pair._tiles(x[r0:r1], y)
        row_part = torch.empty((n_tn, r1 - r0), dtype=torch.float32, device=x.device)
        col_part = torch.empty((n_tm, m), dtype=torch.float32, device=x.device)
        k_part = torch.empty(n_tm * n_tn, dtype=torch.float32, device=x.device)
        pair._launch(
            _pair_lse_kernel, x[r0:r1], y, r2[r0:r1], kappa, u2[r0:r1], v2, row_part, col_part, k_part,
            scalars=(s2, c2), ONE_EXP=one_exp, K_BOUNDED=bounded,
        )  # fmt: skip
        if one_exp:
            sum_partials(row_part, row_acc[r0 - lo : r1 - lo])
            sum_partials(col_part, col_acc, accumulate=True)
        else:
            row_acc[r0 - lo : r1 - lo] = _logsumexp2(row_part, 0)
            torch.logaddexp2(col_acc, _logsumexp2(col_part, 0), out=col_acc)
        k_parts2.append(k_part.sum().log2() if bounded else _logsumexp2(k_part, 0))
    col_acc = ranks.sum_(col_acc) if one_exp else ranks.logsumexp(col_acc, base2=True)
    lz2_xy = ranks.logsumexp(_logsumexp2(torch.stack(k_parts2), 0) if k_parts2 else _minus_inf(x), base2=True)
    return row_acc, col_acc, lz2_xy


def _diagonal_logits(pair: TritonStrips, logits: tuple[Any, ...]) -> Tensor:
    """(N,) t_ii, the positives' base-2 logits exactly as the forward tiles computed them (square tiles)."""
    x, y, r2, kappa, u2, v2, s2, c2, one_exp, bounded = logits
    diag2 = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    pair._launch(
        _pair_lse_kernel, x, y, r2, kappa, u2, v2, diag2, diag2, diag2, scalars=(s2, c2),
        n_tiles=triton.cdiv(x.shape[0], pair.block_m), ONE_EXP=one_exp, K_BOUNDED=bounded, DIAGONAL=True,
    )  # fmt: skip
    return diag2


def _symmetric_sums(
    tiles: TritonStrips, a: Tensor, sq: Tensor, inv_s2: float, want_sigma: bool, want_total: bool, rows: int,
    ranks: Ranks,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """This rank's share of the upper triangle of A A^T with weights exp(l - 0) (the diagonal's logit,
    the largest): ((W + W^T) a (N, D), its row masses (N,), sum W l, sum W), float32; rows outside
    the share are zeros."""
    a0, a1 = ranks.triangle(a.shape[0], tiles.block_m)
    grad, _, mass, _, dot, total = kernel_term_sums(
        tiles, a[a0:a1], a[a0:], sq[a0:a1], sq[a0:], inv_s2, 0.0, 1.0, True, want_sigma, want_total, rows,
        torch.float32,
    )  # fmt: skip
    return _rows_from(grad, a0), _rows_from(mass, a0), dot, total


def _symmetric_forward(
    tiles: TritonStrips, a: Tensor, sq: Tensor, inv_s2: float, eager: bool, want_sigma: bool, bounded: bool,
    rows: int, ranks: Ranks,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:  # fmt: skip
    """log sum_ij k(a_i, a_j) over all pairs, and with `eager` (gradients wanted) what the backward
    needs, from the same single pass: ((W + W^T) a, its row masses, sum W l)."""
    if eager:
        grad, mass, dot, total = _symmetric_sums(tiles, a, sq, inv_s2, want_sigma, True, rows, ranks)
        # The symmetric strips visit half the pairs, hence + log 2; the weights exp(l - 0) <= 1 add up.
        return ranks.sum_(total).log() + LOG2, (grad, mass, dot)
    a0, a1 = ranks.triangle(a.shape[0], tiles.block_m)
    ends = [(r0, min(r0 + rows, a1)) for r0 in range(a0, a1, rows)]
    parts = [tiles.kernel_lse(a[r0:r1], a[r0:], sq[r0:r1], sq[r0:], inv_s2, True, bounded) for r0, r1 in ends]
    local = torch.logsumexp(torch.stack(parts), 0) if parts else _minus_inf(a)
    return ranks.logsumexp(local) + LOG2, None


def _info_nce_value(
    row_acc: Tensor,
    col_acc: Tensor,
    one_exp: bool,
    s2: float,
    diag2: Tensor | None,
    positives_of: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float],
    lo: int,
    ranks: Ranks,
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
    half_sq = half_sq_norms(a, torch.float32)
    return (2.0 * half_sq).sqrt().clamp_min_(1e-12).reciprocal_(), half_sq


@checks_finite_once
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
            each kernel takes its measured default (`symmetric_tiles(dtype)` for X X^T and Y Y^T,
            `FORWARD_PAIR_TILES` and `backward_pair_tiles(dtype)` for X Y^T).
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
    # Values are tested in the forward pass's one host read (finite features, positive tensor
    # scalars): each test here would be a GPU sync of its own.
    check_features("x", x, finite=False)
    check_features("y", y, finite=False)
    check_same_dim("x", x, "y", y)
    check_positive("temperature", temperature, read=False)
    check_positive("sigma", sigma, read=False)
    finite = tuple((name, f) for name, f in (("x", x), ("y", y)) if needs_finite_check(f))
    if x.dtype == torch.float64 or y.dtype == torch.float64:
        raise ValueError("the fused Triton path computes in float32; use impl='chunked' for float64 inputs")
    dtype = x.dtype if x.dtype == y.dtype else torch.float32
    sym = tiles or symmetric_tiles(dtype)
    back = pair_tiles or tiles or backward_pair_tiles(dtype)
    fwd = forward_tiles or pair_tiles or tiles or FORWARD_PAIR_TILES
    for t in (sym, fwd, back):
        if chunk_size % t.block_m:
            raise ValueError(f"chunk_size must be a multiple of the tile size {t.block_m}, got {chunk_size}")
    pos_row, pos_w = positives(x.shape[0], y.shape[0], text_to_image, x.device, torch.float32)
    # Python numbers stay on the host (no copy to the device and back); tensors (learnable) are read
    # with the forward's other scalars.
    temp: Tensor | float = (
        float(temperature) if not isinstance(temperature, Tensor) else as_tensor(temperature, torch.float32, x.device)
    )
    sig: Tensor | float = float(sigma) if not isinstance(sigma, Tensor) else as_tensor(sigma, torch.float32, x.device)
    eager = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    out: tuple[Tensor, Tensor] = _PairedInfoNCECS.apply(
        x.to(dtype).contiguous(),
        y.to(dtype).contiguous(),
        temp,
        sig,
        pos_row,
        pos_w,
        (sym, fwd, back),
        chunk_size,
        eager,
        text_to_image is None,  # positives on the diagonal
        Ranks(group),
        finite,
        (temperature, sigma),
    )
    for _, checked in finite:
        record_finite(checked)
    return out
