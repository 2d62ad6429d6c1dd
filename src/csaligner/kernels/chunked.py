"""Log-mean-kernel terms and D_CS in O(N * chunk) memory: strips of rows, one scalar per strip.

log mean_ij k(a_i, b_j) is a log-sum-exp over an (N, M) matrix of kernel logits. The forward
pass walks over strips of `chunk` rows and keeps one log-sum-exp per strip, combined at the end.
For a_i = b_j (the XX and YY terms of D_CS) only the strips' upper-triangular part is visited: a
symmetric matrix is the sum of its upper part and that part's transpose, which halves the work.

The backward pass can skip a second sweep. The weights need only *some* offset that keeps
exp(l - offset) in range, not the final log-sum-exp: for XX^T and YY^T the largest logit is the
diagonal's 0, and for a vs b a range of at most 80 nats is known from the norms. So when the
features need gradients, the forward pass builds each strip once, keeps the unnormalised (N, D)
gradients, and the backward pass only rescales them (`_LogMeanKernel`). InfoNCE cannot
(`csaligner.kernels.nce`): each weight needs both its row's and its column's normaliser, known
only after a full sweep.

The strip arithmetic sits behind `StripBackend` (`csaligner.kernels.strips`): `TorchStrips` (any
device) or the Triton tiles of `csaligner.kernels.triton_kernels`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from csaligner._validation import check_chunk_size, check_features, check_positive, check_same_dim, checks_finite_once
from csaligner.kernels.strips import (
    DEFAULT_STRIP_ELEMENTS,
    LOG2,
    MAX_BOUNDED_NATS,
    MIN_STRIP_ROWS,
    StripBackend,
    TorchStrips,
    as_tensor,
    autocast_off,
    compute_dtype,
    half_sq_norms,
    mm_accumulate,
    strip_rows,
)


class _LogMeanKernel(torch.autograd.Function):
    """log mean_ij exp(-||a_i - b_j||^2 / (2 sigma^2)); b None means b = a (symmetric, half the work).

    With `eager` (grad mode on and a feature needs its gradient) and an offset known in advance
    (`one_pass_offset`), the forward pass builds the weight strips once, relative to that offset,
    and keeps the unnormalised feature gradients; backward only rescales them. Otherwise the
    forward takes log-sum-exps and the backward recomputes the strips (with the same offset, so a
    second backward through a retained graph matches the first bit for bit).
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx: Any,
        a: Tensor,
        b: Tensor | None,
        sigma: Tensor,
        backend: StripBackend,
        rows: int,
        work: torch.dtype,
        eager: bool,
    ) -> Tensor:
        inv_s2 = 1.0 / float(sigma) ** 2
        sym = b is None
        bb = a if b is None else b
        u = half_sq_norms(a, work) * -inv_s2  # (N,) -||a||^2 / (2 sigma^2)
        v = u if b is None else half_sq_norms(bb, work) * -inv_s2
        offset = one_pass_offset(u, v, sym)
        ctx.kept = None
        if offset is None or not eager:
            log_z = kernel_log_sum(backend, a, bb, u, v, inv_s2, sym, rows, work)
        else:
            da, db, dot, total = kernel_term_grads(
                backend, a, bb, u, v, inv_s2, offset, 1.0, sym, ctx.needs_input_grad[2], True, rows, work
            )
            log_z = total.log() + offset + (LOG2 if sym else 0.0)
            ctx.kept = (da, db, dot)  # weights exp(l - offset): backward scales by exp(offset - log_z)
        ctx.save_for_backward(a, bb, u, v, log_z)
        ctx.sym, ctx.inv_s2, ctx.sigma, ctx.backend, ctx.rows = sym, inv_s2, float(sigma), backend, rows
        ctx.offset = offset
        return log_z - math.log(a.shape[0] * bb.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, b, u, v, log_z = ctx.saved_tensors
        sym, inv_s2, rows, backend = ctx.sym, ctx.inv_s2, ctx.rows, ctx.backend
        want_dot = ctx.needs_input_grad[2]
        lz, g, work = float(log_z), float(grad), u.dtype
        offset = lz if ctx.offset is None else ctx.offset
        if ctx.kept is not None:  # built by the forward pass and taken (scaled in place below)
            (da, db, dot), ctx.kept = ctx.kept, None
        else:  # with the forward's offset, so that a retained graph's next backward gives the same bits
            da, db, dot, _ = kernel_term_grads(
                backend, a, b, u, v, inv_s2, offset, 1.0, sym, want_dot, False, rows, work
            )
        factor = g * math.exp(offset - lz)
        # dl_ij/da_i = (b_j - a_i) / sigma^2; the symmetric case sums W + W^T, hence one pass over both.
        da.mul_(factor * (2 * inv_s2 if sym else inv_s2))
        db_out = None if db is None else db.mul_(factor * inv_s2).to(b.dtype)
        # dl/dsigma = -2 l / sigma
        dsigma = dot * (factor * -2.0 / ctx.sigma * (2.0 if sym else 1.0)) if want_dot else None
        return da.to(a.dtype), db_out, dsigma, None, None, None, None


def kernel_log_sum(
    backend: StripBackend,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    inv_s2: float,
    symmetric: bool,
    rows: int,
    work: torch.dtype,
) -> Tensor:
    """log sum_ij exp(l_ij) over all of a (N, D) against b (M, D), strip by strip (-inf for N = 0).

    `symmetric` (a is the first rows of b, usually b itself): only strips on and above the diagonal
    are visited, then doubled.
    """
    parts = []
    for r0 in range(0, a.shape[0], rows):
        cols = slice(r0, None) if symmetric else slice(None)
        parts.append(backend.kernel_lse(a[r0 : r0 + rows], b[cols], u[r0 : r0 + rows], v[cols], inv_s2, symmetric))
    if not parts:
        return torch.tensor(-math.inf, dtype=work, device=a.device)
    return torch.logsumexp(torch.stack(parts).to(work), 0) + (LOG2 if symmetric else 0.0)


def one_pass_offset(u: Tensor, v: Tensor, symmetric: bool) -> float | None:
    """An offset for exp(l - offset) known before any strip is seen, or None when there is none.

    The symmetric terms' largest logit is 0 (the diagonal, a_i = a_i). For a_i vs b_j the logits
    lie in [2 min u + 2 min v, 0] (|a - b|^2 <= 2|a|^2 + 2|b|^2); when that range spans at most
    80 nats its midpoint keeps every weight within exp(+-40), far from float32's limits.
    """
    if symmetric:
        return 0.0
    low = 2.0 * float(u.min() + v.min())
    return 0.5 * low if low >= -MAX_BOUNDED_NATS else None


def kernel_term_grads(
    backend: StripBackend,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    inv_s2: float,
    log_z: float,
    g: float,
    symmetric: bool,
    want_dot: bool,
    want_total: bool,
    rows: int,
    work: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Strip by strip, sum_j W_ij (b_j - a_i) for each a_i and sum_i W_ij (a_i - b_j) for each b_j.

    W = g * exp(l - log_z) as `StripBackend.kernel_grad` writes it. For `symmetric` (a is the first
    rows of b, usually b itself; each strip of a meets b from its own first row on, i.e. the upper
    triangle) the two sums fold into one result shaped like b (W + W^T) and the second is None.
    Also returns sum(W * l) (when want_dot, else 0) and sum(W) (when want_total, else 0), all in
    `work` precision.

    The GEMMs accumulate (W b)_i and the row masses of the weights *as stored*, so the difference
    (W b)_i - rowsum_i a_i cancels exactly whatever the strip precision.
    """
    da, db, a_mass, b_mass, dot, total = kernel_term_sums(
        backend, a, b, u, v, inv_s2, log_z, g, symmetric, want_dot, want_total, rows, work
    )
    da.addcmul_(a_mass.unsqueeze(1), b if symmetric else a, value=-1.0)
    if db is not None:
        db.addcmul_(b_mass.unsqueeze(1), b, value=-1.0)
    return da, db, dot, total


def kernel_term_sums(
    backend: StripBackend,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    inv_s2: float,
    log_z: float,
    g: float,
    symmetric: bool,
    want_dot: bool,
    want_total: bool,
    rows: int,
    work: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """`kernel_term_grads` before its last pass: (W b, W^T a or None, row masses, column masses, dot,
    total), so that a caller with more terms subtracts all masses times the features in one pass.
    For `symmetric` the first result is (W + W^T) b and both masses are the same tensor."""
    da = torch.zeros((b if symmetric else a).shape, dtype=work, device=a.device)
    a_mass = torch.zeros(da.shape[0], dtype=work, device=a.device)
    db = da if symmetric else torch.zeros(b.shape, dtype=work, device=a.device)
    b_mass = a_mass if symmetric else torch.zeros(b.shape[0], dtype=work, device=a.device)
    dots: list[Tensor] = []  # per strip, added up once at the end (not two small launches per strip)
    totals: list[Tensor] = []
    ag, bg = a, b  # the operands in the strip's dtype
    # A whole diagonal block (mirror_diagonal) has been applied by W b: W^T only past it.
    mirror = symmetric and getattr(backend, "mirror_diagonal", False)
    for r0 in range(0, a.shape[0], rows):
        r1 = min(r0 + rows, a.shape[0])
        c0 = r0 if symmetric else 0
        st = backend.kernel_grad(a[r0:r1], b[c0:], u[r0:r1], v[c0:], inv_s2, log_z, g, symmetric, want_dot, want_total)
        if ag.dtype != st.w.dtype:
            ag, bg = a.to(st.w.dtype), b.to(st.w.dtype)
        mm_accumulate(da[r0:r1], st.w, bg[c0:])
        a_mass[r0:r1] += st.row_mass
        t0 = r1 if mirror else c0  # the first of b's rows that W^T reaches
        if t0 < b.shape[0]:
            mm_accumulate(db[t0:], st.w[:, t0 - c0 :].T, ag[r0:r1])
        b_mass[c0:] += st.col_mass
        if st.dot is not None:
            dots.append(st.dot)
        if st.total is not None:
            totals.append(st.total)
    dot, total = (
        torch.stack(parts).to(work).sum() if parts else torch.zeros((), dtype=work, device=a.device)
        for parts in (dots, totals)
    )
    return da, None if symmetric else db, a_mass, b_mass, dot, total


def streamed_log_mean_kernel(
    a: Tensor,
    b: Tensor | None,
    sigma: float | Tensor,
    *,
    backend: StripBackend | None = None,
    chunk_size: int | None = None,
    work: torch.dtype | None = None,
) -> Tensor:
    """log mean_ij k(a_i, b_j) for a (N, D) and b (M, D); b None means b = a and visits half the pairs.

    sigma may be a float or a 0-dim tensor; a tensor that requires grad gets its gradient. When the
    features need gradients (grad mode on), the forward pass computes them as it goes where an
    offset is known in advance (always for b None; for a vs b when the logits span <= 80 nats),
    which saves the backward pass's second sweep over the strips.
    """
    chunk_size = check_chunk_size(chunk_size)
    backend = backend or TorchStrips()
    n_cols = a.shape[0] if b is None else b.shape[0]
    # The symmetric term weights whole diagonal tiles by 1/2: its strips must start on tile rows.
    multiple = backend.symmetric_rows if b is None else 1
    if chunk_size is not None and chunk_size % multiple:
        raise ValueError(
            f"chunk_size must be a multiple of the backend's tile rows ({multiple}) for a symmetric "
            f"kernel term, got {chunk_size}"
        )
    rows = chunk_size or max(MIN_STRIP_ROWS, strip_rows(a.shape[0], n_cols, DEFAULT_STRIP_ELEMENTS, multiple))
    work = work or compute_dtype(a, a if b is None else b)
    sig = as_tensor(sigma, work, a.device)
    eager = torch.is_grad_enabled() and (a.requires_grad or (b is not None and b.requires_grad))
    out: Tensor = _LogMeanKernel.apply(
        a.contiguous(), None if b is None else b.contiguous(), sig, backend, rows, work, eager
    )
    return out


@checks_finite_once
def streamed_cs_divergence(
    x: Tensor,
    y: Tensor,
    sigma: float | Tensor,
    *,
    backend: StripBackend | None = None,
    chunk_size: int | None = None,
    operand_dtype: torch.dtype | None = None,
    center: bool = True,
) -> Tensor:
    """D_CS(x, y) equal to `losses.cs_divergence` (no weights), in O((N + M) * chunk) memory.

    Args:
        x: (N, D) samples, any norm; y: (M, D) samples, M != N allowed.
        sigma: bandwidth > 0, float or 0-dim tensor (gets a gradient if it requires one).
        backend, chunk_size: as in `streamed_info_nce`.
        operand_dtype: dtype the strips read (default: the compute dtype).
        center: subtract the pooled mean (detached) first, as the dense path does: D_CS is
            translation invariant and ||a||^2 + ||b||^2 - 2ab stays accurate near the origin.

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    check_positive("sigma", sigma)
    work = compute_dtype(x, y)
    xw, yw = x.to(work), y.to(work)
    if center:
        c = torch.cat([xw, yw]).mean(0).detach()
        xw, yw = xw - c, yw - c
    xo, yo = xw.to(operand_dtype or work), yw.to(operand_dtype or work)
    lxx, lyy, lxy = (
        streamed_log_mean_kernel(a, b, sigma, backend=backend, chunk_size=chunk_size, work=work)
        for a, b in ((xo, None), (yo, None), (xo, yo))
    )
    return lxx + lyy - 2.0 * lxy
