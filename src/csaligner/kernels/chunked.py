"""InfoNCE and log-mean-kernel terms in O(N * chunk) memory: strips of rows, statistics, recompute.

Both losses are log-sum-exps over an (N, M) matrix of logits. Instead of holding it, the forward
pass walks over strips of `chunk` rows and keeps only O(N + M) statistics:

* InfoNCE: every strip covers whole rows, so its row log-sum-exp is exact; the column log-sum-exp
  is accumulated across strips (`logaddexp`, i.e. an online max + sum). The positive logits are
  N dot products. The loss is assembled from these vectors.
* log mean_ij k(a_i, b_j): one scalar log-sum-exp per strip, combined at the end. For a_i = b_j
  (the XX and YY terms of D_CS) only the strips' upper-triangular part is visited: a
  symmetric matrix is the sum of its upper part and that part's transpose, which halves the work.

The backward pass recomputes each strip's logits from the saved inputs and statistics, turns them
into weights dL/dlogit (a (chunk, M) strip, never (N, M)), and applies them with two matmuls.

The kernel terms can skip that second sweep. Their weights need only *some* offset that keeps
exp(l - offset) in range, not the final log-sum-exp: for XX^T and YY^T the largest logit is the
diagonal's 0, and for a vs b a range of at most 80 nats is known from the norms. So when the
features need gradients, the forward pass builds each strip once, keeps the unnormalised (N, D)
gradients, and the backward pass only rescales them (`_LogMeanKernel`). InfoNCE cannot: each
weight needs both its row's and its column's normaliser, known only after a full sweep.

The strip arithmetic sits behind `StripBackend`: `TorchStrips` (here, any device) or the fused
Triton kernels in `csaligner.kernels.triton_kernels`. The autograd Functions are shared.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner._validation import check_features, check_positive, check_same_dim
from csaligner.losses.contrastive import check_text_to_image

LOG2 = math.log(2.0)
DEFAULT_STRIP_ELEMENTS = 1 << 24
"""Default strip size for the torch path: chunk * M ~ 16M logits (64 MiB in float32)..."""
MIN_STRIP_ROWS = 512
"""...but at least 512 rows: thinner strips make small matmuls and Python loop overhead dominate."""
MAX_BOUNDED_NATS = 80.0
"""exp(-80) ~ 2e-35 is still a normal float32: logits known to lie in [-80, 0] need no max offset."""


class KernelStrip(NamedTuple):
    """One strip of kernel weights W = g * w_ij * exp(l_ij - log_z) and what the callers need of it."""

    w: Tensor
    """(S, M) weights, possibly stored rounded (bfloat16 for half operands)."""
    row_mass: Tensor
    """(S,) row sums of W as stored."""
    col_mass: Tensor
    """(M,) column sums of W as stored."""
    dot: Tensor | None
    """sum(W * l) (unrounded W), when asked for: the bandwidth's gradient."""
    total: Tensor | None
    """sum(W) of the unrounded weights, when asked for: the forward value of a one-pass term."""


class StripBackend(Protocol):
    """Arithmetic on one strip of rows; `a` is (S, D), `b` is (M, D), both contiguous.

    Kernel logits are l_ij = min(0, inv_s2 * a_i.b_j + u_i + v_j) = -||a_i - b_j||^2 / (2 sigma^2)
    with u = -||a||^2 / (2 sigma^2). With `symmetric`, `b` starts at the strip's first row
    (b[:S] is a): the backend adds log-weights w_ij (0 below the diagonal, 1/2 on it, 1 above,
    at any granularity) so that sum over strips of w * P, plus its transpose, is the full matrix.
    """

    @property
    def symmetric_rows(self) -> int:
        """A symmetric strip's rows must be a multiple of this unless the strip reaches b's last row
        (its diagonal block is weighted as a whole)."""
        ...

    gathers_positives: bool
    """Whether `logits_lse_split` returns the positives' logits (a backend without the attribute:
    no, and InfoNCE's value takes a separate dot per pair)."""

    def logits_lse(self, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Row (S,) and column (M,) log-sum-exp of scale * a @ b.T."""
        ...

    def logits_lse_split(
        self, a: Tensor, b: Tensor, scale: float, pos_row: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """`logits_lse` as (row max, row log-sum-exp minus it, column max, column ...), and the
        logits at the positives, l[pos_row[j], j] where pos_row[j] >= 0 (strip-local rows; other
        entries unspecified), the very floats the maxima were taken over: a loss near 0 is then a
        difference of equal numbers plus a small log-sum, not two rounded ~scale-sized values.
        None instead of the positives where a backend cannot gather them."""
        ...

    def logits_grad(
        self,
        a: Tensor,
        b: Tensor,
        scale: float,
        row_lse: Tensor,
        col_lse: Tensor,
        w_row: float,
        w_col: float,
        pos_row: Tensor,
        pos_w: Tensor,
        want_dot: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """G (S, M) = w_row softmax_rows + w_col softmax_cols - pos_w at (pos_row[j], j), and sum(G * logits).

        pos_row (M,) is the strip-local row of column j's positive, or -1 when it lies elsewhere.
        """
        ...

    def kernel_lse(self, a: Tensor, b: Tensor, u: Tensor, v: Tensor, inv_s2: float, symmetric: bool) -> Tensor:
        """Scalar log sum_ij w_ij exp(l_ij) over the strip."""
        ...

    def kernel_grad(
        self,
        a: Tensor,
        b: Tensor,
        u: Tensor,
        v: Tensor,
        inv_s2: float,
        log_z: float,
        g: float,
        symmetric: bool,
        want_dot: bool,
        want_total: bool = False,
    ) -> KernelStrip:
        """W (S, M) = g * w * exp(l - log_z), its row and column sums, sum(W * l) and sum(W).

        W may be stored rounded (bfloat16 for half inputs); the row and column sums are those of the
        stored values, so that sum_j W_ij (b_j - a_i) = (W b)_i - rowsum_i a_i cancels exactly in the
        caller. log_z is any offset >= max(l) - 80: the backward pass gives the term's log-sum-exp
        (weights are then the softmax), a one-pass forward a bound known in advance.
        """
        ...


class TorchStrips:
    """Strip arithmetic with plain torch ops (CPU or CUDA); tiles are (S, M) in the input dtype."""

    gathers_positives = True

    @property
    def symmetric_rows(self) -> int:
        return 1  # the diagonal block is exactly the strip's (S, S) square

    def logits_lse(self, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        t = torch.mm(a, b.T).mul_(scale)  # (S, M) logits
        return torch.logsumexp(t, 1), torch.logsumexp(t, 0)

    def logits_lse_split(
        self, a: Tensor, b: Tensor, scale: float, pos_row: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        t = torch.mm(a, b.T).mul_(scale)
        row_max, col_max = t.amax(1), t.amax(0)  # finite: unit vectors, a finite scale
        e = torch.sub(t, row_max.unsqueeze(1)).exp_()
        row_log = e.sum(1, dtype=torch.float32).log_() if t.dtype.itemsize < 4 else e.sum(1).log_()  # half: no inf
        torch.sub(t, col_max.unsqueeze(0), out=e).exp_()
        col_log = e.sum(0, dtype=torch.float32).log_() if t.dtype.itemsize < 4 else e.sum(0).log_()
        pos = t.gather(0, pos_row.clamp_min(0).unsqueeze(0)).squeeze(0)  # no host sync (nonzero would)
        return row_max, row_log, col_max, col_log, pos

    def logits_grad(
        self,
        a: Tensor,
        b: Tensor,
        scale: float,
        row_lse: Tensor,
        col_lse: Tensor,
        w_row: float,
        w_col: float,
        pos_row: Tensor,
        pos_w: Tensor,
        want_dot: bool,
    ) -> tuple[Tensor, Tensor | None]:
        t = torch.mm(a, b.T).mul_(scale)
        g = (t - row_lse.unsqueeze(1)).exp_().mul_(w_row)
        g += (t - col_lse.unsqueeze(0)).exp_().mul_(w_col)
        cols = (pos_row >= 0).nonzero().squeeze(1)
        g.index_put_((pos_row[cols], cols), -pos_w[cols], accumulate=True)
        dot = torch.dot(g.flatten(), t.flatten().to(g.dtype)) if want_dot else None  # t: half operands' logits
        return g, dot

    def _kernel_logits(self, a: Tensor, b: Tensor, u: Tensor, v: Tensor, inv_s2: float) -> Tensor:
        t = torch.addmm(v.unsqueeze(0), a, b.T, alpha=inv_s2)
        t += u.unsqueeze(1)
        return t.clamp_max_(0.0)  # d^2 >= 0; rounding can push it below 0 for near-duplicates

    def kernel_lse(self, a: Tensor, b: Tensor, u: Tensor, v: Tensor, inv_s2: float, symmetric: bool) -> Tensor:
        t = self._kernel_logits(a, b, u, v, inv_s2)
        if symmetric:
            t[:, : a.shape[0]] -= LOG2  # the (S, S) diagonal block counts half (it is visited once)
        return torch.logsumexp(t.flatten(), 0)

    def kernel_grad(
        self,
        a: Tensor,
        b: Tensor,
        u: Tensor,
        v: Tensor,
        inv_s2: float,
        log_z: float,
        g: float,
        symmetric: bool,
        want_dot: bool,
        want_total: bool = False,
    ) -> KernelStrip:
        t = self._kernel_logits(a, b, u, v, inv_s2)
        w = (t - log_z).exp_() if want_dot else t.sub_(log_z).exp_()
        w.mul_(g)
        if symmetric:
            w[:, : a.shape[0]] *= 0.5
        dot = torch.dot(w.flatten(), t.flatten()) if want_dot else None
        row_mass = w.sum(1)
        return KernelStrip(w, row_mass, w.sum(0), dot, row_mass.sum() if want_total else None)


def autocast_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's forward or backward with autocast off on its tensors' device.

    The strip paths choose their own precision (float32 statistics; half operands only where the
    inputs are half). Under an ambient autocast, matmuls inside would return float16/bfloat16
    logits, and the one-pass weights exp(l - offset) overflow float16. The dense reference,
    by contrast, runs under autocast like any other torch code.
    """

    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(ctx, *args)
        with torch.autocast(device.type, enabled=False):
            return fn(ctx, *args)

    return wrapper


def strip_rows(n_rows: int, n_cols: int, budget: int, multiple: int = 1) -> int:
    """Rows per strip so that rows * n_cols <= budget elements (at least `multiple` rows)."""
    rows = max(multiple, budget // max(n_cols, 1) // multiple * multiple)
    return min(rows, -(-n_rows // multiple) * multiple)


class _InfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE from row/column log-sum-exps; see `streamed_info_nce`."""

    @staticmethod
    @autocast_off
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        pos_row: Tensor,
        pos_w: Tensor,
        backend: StripBackend,
        rows: int,
    ) -> Tensor:
        s = float(scale)
        work = torch.float32 if x.dtype != torch.float64 else x.dtype
        row_lse, col_lse, value = nce_stats_and_value(backend, x, y, s, rows, work, pos_row, pos_w)
        ctx.save_for_backward(x, y, pos_row, pos_w, row_lse, col_lse)
        ctx.scale, ctx.backend, ctx.rows = s, backend, rows
        return value

    @staticmethod
    @autocast_off
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, pos_row, pos_w, row_lse, col_lse = ctx.saved_tensors
        s, backend, rows = ctx.scale, ctx.backend, ctx.rows
        g, n, m = float(grad), x.shape[0], y.shape[0]
        dx = torch.empty_like(x)
        dy = torch.zeros(y.shape, dtype=row_lse.dtype, device=y.device)  # accumulated over strips
        weights = (0.5 * g / n, 0.5 * g / m, pos_w * g)
        want_dot = ctx.needs_input_grad[2]
        dot = nce_row_grads(backend, x, y, s, row_lse, col_lse, weights, pos_row, want_dot, 0, n, rows, dx, dy)
        dscale = dot / s if want_dot else None  # logits = scale * x.y: d/dscale = sum(G * l) / scale
        return dx, (dy * s).to(y.dtype), dscale, None, None, None, None


class NceSplit(NamedTuple):
    """InfoNCE's log-sum-exps over rows lo:hi of the logits, as (max, log-sum minus max)."""

    row_max: Tensor
    """(hi - lo,)"""
    row_log: Tensor
    col_max: Tensor
    """(M,) over rows lo:hi only"""
    col_log: Tensor
    pos: Tensor | None
    """(M,) the logits at the positives whose row lies in lo:hi, as the strips computed them (0
    elsewhere); None where the backend cannot gather them."""


def nce_split_stats(
    backend: StripBackend, x: Tensor, y: Tensor, s: float, lo: int, hi: int, rows: int, work: torch.dtype,
    pos_row: Tensor,
) -> NceSplit:  # fmt: skip
    """InfoNCE's row and column log-sum-exps over rows lo:hi of s * x @ y.T, strip by strip, in split
    form (`logits_lse_split`) merged across strips: the maxima are logits as computed and the
    log-sums stay small, so that `nce_value_terms` can subtract the positives' logits exactly."""
    n, m = hi - lo, y.shape[0]
    row_max = torch.empty(n, dtype=work, device=x.device)
    row_log = torch.empty(n, dtype=work, device=x.device)
    col_max = torch.full((m,), -math.inf, dtype=work, device=x.device)
    col_log = torch.zeros(m, dtype=work, device=x.device)
    # Whether positives come back is the backend's property, not the rows': every rank decides alike.
    gathers = getattr(backend, "gathers_positives", False) and hasattr(backend, "logits_lse_split")
    pos = torch.zeros(m, dtype=work, device=x.device) if gathers else None
    for r0 in range(lo, hi, rows):
        r1 = min(r0 + rows, hi)
        local = torch.where((pos_row >= r0) & (pos_row < r1), pos_row - r0, -1)
        r_max, r_log, c_max, c_log, p = _lse_split(backend, x[r0:r1], y, s, local)
        row_max[r0 - lo : r1 - lo], row_log[r0 - lo : r1 - lo] = r_max, r_log
        col_max, col_log = merge_split(col_max, col_log, c_max.to(work), c_log.to(work))
        if pos is not None:
            if p is None:
                raise TypeError(f"{type(backend).__name__}.gathers_positives is True but logits_lse_split gave none")
            pos = torch.where(local >= 0, p.to(work), pos)
    return NceSplit(row_max, row_log, col_max, col_log, pos)


def _lse_split(
    backend: StripBackend, a: Tensor, b: Tensor, s: float, pos_row: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """`backend.logits_lse_split`, or for a backend written before it (only `logits_lse`) the
    log-sum-exps as maxima with zero log-sums and no positives."""
    split = getattr(backend, "logits_lse_split", None)
    if split is not None:
        out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None] = split(a, b, s, pos_row)
        return out
    row, col = backend.logits_lse(a, b, s)
    return row, torch.zeros_like(row), col, torch.zeros_like(col), None


def merge_split(m1: Tensor, l1: Tensor, m2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """(max, log-sum minus max) of two such pairs, elementwise; -inf maxima allowed on one side."""
    top = torch.maximum(m1, m2)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top, torch.log(torch.exp(m1 - safe + l1) + torch.exp(m2 - safe + l2))


def nce_value_terms(st: NceSplit, pos: Tensor, pos_row: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """float64 (sum over rows lo:hi of row_lse_i - mean_{j in P_i} l_ij, and the (M,) col_lse_j - l_pj,j).

    `st` holds rows lo:hi, its column statistics and `pos` must be over all rows (the caller merges
    ranks). InfoNCE = 0.5 row_sum / N + 0.5 mean(col_terms). Where a positive is its row's or column's
    largest logit the difference is exactly 0 plus a small log-sum: a loss near 0 keeps float32's
    ~1e-7 absolute precision, as dense float32 does, instead of rounding at the scale s."""
    f64, dev, n = torch.float64, pos.device, hi - lo
    col_terms = (st.col_max.to(f64) - pos.to(f64)) + st.col_log.to(f64)
    if n == 0:  # an empty row share (more ranks than rows): no index to add at
        return torch.zeros((), dtype=f64, device=dev), col_terms
    mine = (pos_row >= lo) & (pos_row < hi)
    idx = torch.where(mine, pos_row - lo, 0)
    counts = torch.zeros(n, dtype=f64, device=dev).index_add_(0, idx, mine.to(f64))
    pos_sum = torch.zeros(n, dtype=f64, device=dev).index_add_(0, idx, torch.where(mine, pos.to(f64), 0.0))
    row_pos = torch.where(counts > 0, pos_sum / counts.clamp_min(1.0), 0.0)  # images without captions: 0
    row_terms = (st.row_max.to(f64) - row_pos) + st.row_log.to(f64)
    return row_terms.sum(), col_terms


def nce_stats_and_value(
    backend: StripBackend,
    x: Tensor,
    y: Tensor,
    s: float,
    rows: int,
    work: torch.dtype,
    pos_row: Tensor,
    pos_w: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """`nce_split_stats` over all rows as log-sum-exps, and InfoNCE's value (see `nce_value_terms`). Backends that
    cannot gather the positives get a float32 dot of each pair (~1e-7 s from the strip's logit)."""
    n = x.shape[0]
    st = nce_split_stats(backend, x, y, s, 0, n, rows, work, pos_row)
    row_lse, col_lse = st.row_max + st.row_log, st.col_max + st.col_log
    if st.pos is not None:
        row_sum, col_terms = nce_value_terms(st, st.pos, pos_row, 0, n)
        value = 0.5 * row_sum / n + 0.5 * col_terms.mean()
    else:
        f64 = torch.float64
        pos_logit = positive_dots(x, y, pos_row, False, work).to(f64) * s  # (M,) l_{pos(j), j}
        lse = 0.5 * row_lse.to(f64).mean() + 0.5 * col_lse.to(f64).mean()
        value = lse - (pos_w.to(f64) * pos_logit).sum()
    return row_lse, col_lse, value.to(work)


def positive_dots(
    x: Tensor, y: Tensor, pos_row: Tensor, identity: bool, work: torch.dtype = torch.float32, rows: int = 8192
) -> Tensor:
    """(M,) x[pos_row[j]] . y_j in `work` precision, a few thousand rows at a time (no (M, D) copies
    in `work`); `identity`: pos_row is arange(M), no gather."""
    out = torch.empty(y.shape[0], dtype=work, device=y.device)
    for r0 in range(0, y.shape[0], rows):
        sl = slice(r0, r0 + rows)
        out[sl] = ((x[sl] if identity else x[pos_row[sl]]).to(work) * y[sl].to(work)).sum(1)
    return out


def nce_row_grads(
    backend: StripBackend,
    x: Tensor,
    y: Tensor,
    s: float,
    row_lse: Tensor,
    col_lse: Tensor,
    weights: tuple[float, float, Tensor],
    pos_row: Tensor,
    want_dot: bool,
    lo: int,
    hi: int,
    rows: int,
    dx: Tensor,
    dy: Tensor,
) -> Tensor:
    """InfoNCE's gradient from rows lo:hi of the logits: sets dx[lo:hi], adds into dy / s; returns
    sum(G * l) (0 unless want_dot).

    weights = (w_row, w_col, pos_w): G = w_row softmax_rows + w_col softmax_cols - pos_w at each
    text's positive (when that positive's row lies in lo:hi). row_lse holds rows lo:hi only;
    col_lse is over all rows.
    """
    w_row, w_col, pos_w = weights
    dot = torch.zeros((), dtype=dy.dtype, device=x.device)
    xg, yg = x, y  # the operands in the strip's dtype (a backend may write bf16 strips for fp16 inputs)
    for r0 in range(lo, hi, rows):
        r1 = min(r0 + rows, hi)
        local = torch.where((pos_row >= r0) & (pos_row < r1), pos_row - r0, -1)
        gs, d = backend.logits_grad(
            x[r0:r1], y, s, row_lse[r0 - lo : r1 - lo], col_lse, w_row, w_col, local, pos_w, want_dot
        )
        if gs.dtype != yg.dtype:
            xg, yg = x.to(gs.dtype), y.to(gs.dtype)
        dx[r0:r1] = torch.mm(gs, yg).mul_(s)
        mm_accumulate(dy, gs.T, xg[r0:r1])
        if d is not None:
            dot += d
    return dot


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
        u = _half_sq_norms(a, work) * -inv_s2  # (N,) -||a||^2 / (2 sigma^2)
        v = u if b is None else _half_sq_norms(bb, work) * -inv_s2
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
    dot = torch.zeros((), dtype=work, device=a.device)
    total = torch.zeros((), dtype=work, device=a.device)
    ag, bg = a, b  # the operands in the strip's dtype
    for r0 in range(0, a.shape[0], rows):
        r1 = min(r0 + rows, a.shape[0])
        c0 = r0 if symmetric else 0
        st = backend.kernel_grad(a[r0:r1], b[c0:], u[r0:r1], v[c0:], inv_s2, log_z, g, symmetric, want_dot, want_total)
        if ag.dtype != st.w.dtype:
            ag, bg = a.to(st.w.dtype), b.to(st.w.dtype)
        mm_accumulate(da[r0:r1], st.w, bg[c0:])
        a_mass[r0:r1] += st.row_mass
        mm_accumulate(db[c0:], st.w.T, ag[r0:r1])
        b_mass[c0:] += st.col_mass
        if st.dot is not None:
            dot += st.dot
        if st.total is not None:
            total += st.total
    return da, None if symmetric else db, a_mass, b_mass, dot, total


def mm_accumulate(acc: Tensor, a: Tensor, b: Tensor, beta: float = 1.0) -> None:
    """acc = beta * acc + a @ b, with acc in float32/float64 and a, b possibly half precision.

    Half operands keep the tensor cores and accumulate into acc's precision without rounding the
    product to half first: on CUDA through `torch.addmm(..., out_dtype=float32)` (torch >= 2.9),
    elsewhere by upcasting (the interpreter tests on CPU).
    """
    if a.dtype == acc.dtype:
        # beta as a separate pass: on an H100, float32 addmm_ with beta != 1 on small shapes did not
        # give the same bits twice (a retained graph's second backward differed); this did.
        if beta != 1.0:
            acc.mul_(beta)
        acc.addmm_(a, b)
    elif acc.is_cuda and acc.dtype == torch.float32 and _fp32_out_gemm():
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        if beta != 1.0:
            acc.mul_(beta)
        acc += torch.mm(a.to(acc.dtype), b.to(acc.dtype))


@functools.cache
def _fp32_out_gemm() -> bool:
    """True when this torch has half x half -> float32 GEMMs (`out_dtype`, torch >= 2.9 on CUDA)."""
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(2, 2, device="cuda")
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool(out[0, 0] == 2.0)
    except (RuntimeError, TypeError):
        return False


def _half_sq_norms(a: Tensor, work: torch.dtype) -> Tensor:
    af = a.to(work)
    return 0.5 * (af * af).sum(1)


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 stays float64; bf16, fp16 and fp32 are computed in float32 (as the dense path)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _as_tensor(value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor; a tensor input keeps its autograd graph."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=device)


def positives(
    n: int, m: int, text_to_image: Tensor | None, device: torch.device, work: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(M,) image row of each text's positive and its loss weight 1/(2M) + 1/(2 N |P_i|)."""
    if text_to_image is None:
        if n != m:
            raise ValueError(
                f"paired InfoNCE needs as many texts as images, got {n} images and {m} texts; "
                "pass text_to_image for several captions per image"
            )
        pos_row = torch.arange(n, device=device)
    else:
        pos_row = check_text_to_image(text_to_image.to(device), n, m).long()
    # 1/(2M) for the text -> image cross-entropy, 1/(2 N |P_i|) for image i's captions.
    counts = torch.bincount(pos_row, minlength=n).to(work)
    return pos_row, 0.5 / m + 0.5 / (n * counts[pos_row])


def streamed_info_nce(
    x: Tensor,
    y: Tensor,
    temperature: float | Tensor,
    text_to_image: Tensor | None = None,
    *,
    backend: StripBackend | None = None,
    chunk_size: int | None = None,
    operand_dtype: torch.dtype | None = None,
) -> Tensor:
    """Symmetric InfoNCE equal to `losses.info_nce`, in O((N + M) * chunk) memory.

    Args:
        x: (N, D) image features (normalised here, as in the dense path).
        y: (M, D) text features; M == N unless text_to_image is given.
        temperature: > 0, float or 0-dim tensor (a learnable temperature gets its gradient).
        text_to_image: optional (M,) image row of each text (multi-positive form).
        backend: strip arithmetic; `TorchStrips()` when None.
        chunk_size: rows per strip; None picks ~16M logits per strip (at least 512 rows).
        operand_dtype: dtype the strips read (default: the compute dtype, float32 or float64).

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    check_positive("temperature", temperature)
    n, m = x.shape[0], y.shape[0]
    work = compute_dtype(x, y)
    pos_row, pos_w = positives(n, m, text_to_image, x.device, work)
    xn = F.normalize(x.to(work), dim=-1).to(operand_dtype or work)
    yn = F.normalize(y.to(work), dim=-1).to(operand_dtype or work)
    scale = 1.0 / _as_tensor(temperature, work, x.device)
    rows = chunk_size or max(MIN_STRIP_ROWS, strip_rows(n, m, DEFAULT_STRIP_ELEMENTS))
    out: Tensor = _InfoNCE.apply(
        xn.contiguous(), yn.contiguous(), scale, pos_row, pos_w, backend or TorchStrips(), rows
    )
    return out


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
    sig = _as_tensor(sigma, work, a.device)
    eager = torch.is_grad_enabled() and (a.requires_grad or (b is not None and b.requires_grad))
    out: Tensor = _LogMeanKernel.apply(
        a.contiguous(), None if b is None else b.contiguous(), sig, backend, rows, work, eager
    )
    return out


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
