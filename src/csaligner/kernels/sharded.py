"""InfoNCE + D_CS on a global batch, with the work split by rows across torch.distributed ranks.

Every rank holds the same global features (gathered with `all_gather_with_grad`). Rank r of W
takes an even share of the rows of X Y^T (InfoNCE) and of X_all Y_all^T (the cross kernel term),
each against all columns, and a balanced share of the upper triangles of X_all X_all^T and
Y_all Y_all^T (rows [lo, hi) against the columns from lo on, `triangle_share`). The ranks
exchange only small statistics:

* InfoNCE: the (M,) column log-sum-exps (an all-reduce of their max, then of a sum), the (M,)
  positives' logits as the strips computed them (each from the rank holding its row; summed), and
  one float64 scalar, this rank's sum of row terms (`nce.nce_value_terms`);
* D_CS: one log-sum per kernel term (three scalars, the same max-then-sum all-reduce);
* backward: the temperature's and sigma's gradients (two scalars, summed).

Backward recomputes this rank's strips with the global normalisers, as `csaligner.kernels.chunked`
does in one process. It returns world_size x this rank's share of the features' gradients:
`all_gather_with_grad`'s backward sums those over ranks into world_size x dL/d(local features),
the convention that DistributedDataParallel's gradient averaging cancels (see
`csaligner.kernels.distributed`). The temperature and sigma get the full dL/d(.) on every rank,
so parameters outside DDP stay equal across ranks.

Each rank thus does 1/W of the work, against all of it when every rank computes the whole loss on
the gathered batch. When the features need gradients the kernel terms take one pass (offsets known
from the global norms, as in `chunked._LogMeanKernel`; the kept gradients are summed into two
(N, D) buffers once the log-sums are all-reduced). InfoNCE still takes two passes. When the pools
are the pairs and the features are bf16/fp16 on the Triton path, `infonce_cs_terms(shard=True)`
runs the fused kernels instead, split the same way (`fused.fused_infonce_cs(group=...)`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from csaligner._validation import check_features, check_positive, check_same_dim
from csaligner.kernels.chunked import kernel_log_sum, kernel_term_grads, one_pass_offset
from csaligner.kernels.nce import nce_row_grads, nce_split_stats, nce_value_terms, positives
from csaligner.kernels.strips import (
    DEFAULT_STRIP_ELEMENTS,
    LOG2,
    MIN_STRIP_ROWS,
    as_tensor,
    autocast_off,
    compute_dtype,
    half_sq_norms,
    strip_rows,
)

if TYPE_CHECKING:
    from csaligner.kernels import Strips

KERNEL_TERMS = ((0, 0, 1.0), (1, 1, 1.0), (0, 1, -2.0))
"""(rows, columns, coefficient) of D_CS = log-sum XX + log-sum YY - 2 log-sum XY, with 0 = X_all and
1 = Y_all (the log(N M) normalisers cancel)."""


def share(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Rows [lo, hi) of n that rank `rank` of `world` takes: contiguous, starting on multiples of
    `align` (a Triton path's tiles); with align 1 the sizes differ by <= 1."""

    def edge(r: int) -> int:
        return n if r >= world else align * (n * r // (world * align))

    return edge(rank), edge(rank + 1)


def triangle_share(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Rows [lo, hi) of a symmetric n x n matrix whose upper triangle (row i: columns i..n-1) has
    about 1/world of the area: the first k rows hold k n - k^2 / 2, so k_r = n (1 - sqrt(1 - r / W)),
    rounded to a multiple of `align` (the backend's `symmetric_rows`)."""

    def edge(r: int) -> int:
        if r >= world:
            return n
        return min(n, align * round(n * (1.0 - math.sqrt(1.0 - r / world)) / align))

    return edge(rank), edge(rank + 1)


def all_logsumexp(t: Tensor, group: Any, base2: bool = False) -> Tensor:
    """Elementwise log-sum-exp (base2: log2-sum-exp2) of t over the ranks (-inf where every rank has -inf)."""
    top = t.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp2(t - top) if base2 else torch.exp(t - top)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return top + (total.log2() if base2 else total.log())


class Ranks:
    """The ranks that share one fused loss (`fused_infonce_cs(group=...)`), or (group None) this process.

    Every rank holds the same global batch; rank r takes rows [lo, hi) of X Y^T and a balanced
    share of the upper triangles of X X^T and Y Y^T (tile-aligned, as `sharded` splits them), and the
    ranks add their column sums, log-sums and the scalars' gradients. One process: no collectives."""

    def __init__(self, group: Any = None) -> None:
        on = group is not None and dist.is_available() and dist.is_initialized()  # None: this process alone
        self.group = group
        self.world = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0

    def share(self, n: int, align: int) -> tuple[int, int]:
        """Rows [lo, hi) of n, starting on multiples of `align` (the strips' tiles)."""
        return share(n, self.rank, self.world, align)

    def triangle(self, n: int, align: int) -> tuple[int, int]:
        """Rows [lo, hi) of this rank's share of an n x n upper triangle (`triangle_share`)."""
        return triangle_share(n, self.rank, self.world, align)

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over the ranks, in place (float32 or float64)."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def logsumexp(self, t: Tensor, base2: bool = False) -> Tensor:
        """Elementwise log-sum-exp (base 2: log2-sum-exp2) of t over the ranks; -inf everywhere stays -inf."""
        if self.world == 1:
            return t
        return all_logsumexp(t, self.group, base2)


class _ShardedInfoNCECS(torch.autograd.Function):
    """(InfoNCE, D_CS) from this rank's rows; see the module docstring."""

    @staticmethod
    @autocast_off
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        xa: Tensor,
        ya: Tensor,
        scale: Tensor,
        sigma: Tensor,
        pos_row: Tensor,
        pos_w: Tensor,
        strips: Strips,
        with_cs: bool,
        eager: bool,
        group: Any,
    ) -> tuple[Tensor, Tensor]:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        s, work, backend = float(scale), pos_w.dtype, strips.backend
        n, m = x.shape[0], y.shape[0]
        lo, hi = share(n, rank, world)
        st = nce_split_stats(backend, x, y, s, lo, hi, _rows(strips, n, m), work, pos_row)
        top = st.col_max.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)  # finite: some rank has rows
        col_sum = torch.exp(st.col_max - top + st.col_log)
        dist.all_reduce(col_sum, group=group)
        glob = st._replace(col_max=top, col_log=col_sum.log())
        row_lse, col_lse = st.row_max + st.row_log, glob.col_max + glob.col_log
        if st.pos is not None:  # (the backend's property: alike on every rank) each text's positive
            # lies in one rank's rows, so the sum gathers them
            dist.all_reduce(st.pos, group=group)
            row_sum, col_terms = nce_value_terms(glob, st.pos, pos_row, lo, hi)
            dist.all_reduce(row_sum, group=group)
            info_nce = (0.5 * row_sum / n + 0.5 * col_terms.mean()).to(work)
        else:
            mine = (pos_row >= lo) & (pos_row < hi)  # texts whose positive is one of this rank's rows
            pos_logit = (x[pos_row[mine]].to(work) * y[mine].to(work)).sum(1) * s
            sums = torch.stack([row_lse.sum(), (pos_w[mine] * pos_logit).sum()])
            dist.all_reduce(sums, group=group)
            info_nce = 0.5 * sums[0] / n + 0.5 * col_lse.mean() - sums[1]
        inv_s2 = 1.0 / float(sigma) ** 2
        ctx.kept, ctx.offsets = None, None
        ux = uy = log_z = torch.zeros(0, dtype=work, device=x.device)
        cs = torch.zeros((), dtype=work, device=x.device)
        if with_cs:
            ux, uy = half_sq_norms(xa, work) * -inv_s2, half_sq_norms(ya, work) * -inv_s2
            sq = (ux, uy)
            offsets = [one_pass_offset(sq[i], sq[j], i == j) for i, j, _ in KERNEL_TERMS]  # the same on every rank
            ctx.offsets = None if None in offsets else cast(list[float], offsets)
            if eager and ctx.offsets is not None:
                log_z, ctx.kept = _kernel_term_grads(
                    strips, (xa, ya), sq, inv_s2, ctx.needs_input_grad[5], group, offsets=ctx.offsets
                )
            else:
                log_z = _kernel_log_sums(strips, (xa, ya), sq, inv_s2, group)
            cs = sum(coef * lz for (_, _, coef), lz in zip(KERNEL_TERMS, log_z, strict=True))
        ctx.save_for_backward(x, y, xa, ya, pos_row, pos_w, row_lse, col_lse, ux, uy, log_z)
        ctx.scale, ctx.inv_s2, ctx.sigma = s, inv_s2, float(sigma)
        ctx.strips, ctx.with_cs, ctx.group = strips, with_cs, group
        return info_nce, cs

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g_nce: Tensor, g_cs: Tensor) -> tuple[Tensor | None, ...]:
        x, y, xa, ya, pos_row, pos_w, row_lse, col_lse, ux, uy, log_z = ctx.saved_tensors
        s, inv_s2, strips, group = ctx.scale, ctx.inv_s2, ctx.strips, ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gn, gc, work = float(g_nce), float(g_cs), pos_w.dtype
        n, m = x.shape[0], y.shape[0]
        lo, hi = share(n, rank, world)
        dx = torch.zeros_like(x)
        dy = torch.zeros(y.shape, dtype=work, device=y.device)
        weights = (0.5 * gn / n, 0.5 * gn / m, pos_w * gn)
        want_scale, want_sigma = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        rows = _rows(strips, n, m)
        d_scale = nce_row_grads(
            strips.backend, x, y, s, row_lse, col_lse, weights, pos_row, want_scale, lo, hi, rows, dx, dy
        )
        dxa: Tensor | None = None
        dya: Tensor | None = None
        d_sigma = torch.zeros((), dtype=work, device=x.device)
        if ctx.with_cs:
            if ctx.kept is not None:  # built by the forward pass; taken and scaled in place
                (dxa, dya, d_sigma), ctx.kept = ctx.kept, None
            else:  # with the forward's offsets when known: a retained graph's next backward gives the same bits
                _, (dxa, dya, d_sigma) = _kernel_term_grads(
                    strips, (xa, ya), (ux, uy), inv_s2, want_sigma, group, ctx.offsets, None if ctx.offsets else log_z
                )
            dxa.mul_(gc * inv_s2 * world)
            dya.mul_(gc * inv_s2 * world)
            d_sigma = d_sigma * gc
        # This rank's share, times world_size (what all_gather_with_grad's all-reduce expects);
        # the scalars' gradients are summed over ranks, so every rank holds the full one.
        scalars = torch.stack([d_scale / s, d_sigma * (-2.0 / ctx.sigma)])  # dl/dsigma = -2 l / sigma
        dist.all_reduce(scalars, group=group)
        return (
            dx.mul_(world).to(x.dtype),
            dy.mul_(s * world).to(y.dtype),
            None if dxa is None else dxa.to(xa.dtype),
            None if dya is None else dya.to(ya.dtype),
            scalars[0] if want_scale else None,
            scalars[1] if want_sigma else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _term_strips(
    strips: Strips, feats: tuple[Tensor, Tensor], group: Any
) -> list[tuple[int, int, slice, slice, bool, int]]:
    """Per kernel term (KERNEL_TERMS order): its row and column pools, this rank's rows and columns,
    whether it is symmetric, and rows per strip.

    X X^T and Y Y^T: a balanced share of the upper triangle (rows [lo, hi), columns from lo on, the
    symmetric strips of `StripBackend`); X Y^T: an even share of the rows, against all columns.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = []
    for i, j, _ in KERNEL_TERMS:
        sym = i == j
        n = feats[i].shape[0]
        a0, a1 = triangle_share(n, rank, world, strips.backend.symmetric_rows) if sym else share(n, rank, world)
        cols = slice(a0, None) if sym else slice(None)
        out.append((i, j, slice(a0, a1), cols, sym, _rows(strips, feats[i].shape[0], feats[j].shape[0])))
    return out


def _kernel_log_sums(
    strips: Strips, feats: tuple[Tensor, Tensor], sq: tuple[Tensor, Tensor], inv_s2: float, group: Any
) -> Tensor:
    """The three kernel terms' global log-sums (KERNEL_TERMS order) from this rank's strips."""
    work = sq[0].dtype
    parts = [
        kernel_log_sum(strips.backend, feats[i][r], feats[j][c], sq[i][r], sq[j][c], inv_s2, sym, rows, work)
        for i, j, r, c, sym, rows in _term_strips(strips, feats, group)
    ]
    return all_logsumexp(torch.stack(parts), group)


def _kernel_term_grads(
    strips: Strips,
    feats: tuple[Tensor, Tensor],
    sq: tuple[Tensor, Tensor],
    inv_s2: float,
    want_sigma: bool,
    group: Any,
    offsets: list[float] | None = None,
    log_z: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The three kernel terms' global log-sums, and this rank's share of dD_CS/d(x_all, y_all)
    (without the 1/sigma^2 and the upstream gradient) and of sum(softmax * l) for sigma.

    Give `offsets` (known on every rank: the one pass of `chunked._LogMeanKernel`) or `log_z` (the
    global log-sums, for a cross term whose logits span more than 80 nats). Weights are
    exp(l - offset); with offsets each term's local sum is all-reduced as soon as it is built (two
    scalar all-reduces per term). Each term's gradient is then weighted by its coefficient times
    exp(offset - log-sum) and folded into the pools' buffers at once, one term's buffers at a time.
    """
    work = sq[0].dtype
    grads = (
        torch.zeros(feats[0].shape, dtype=work, device=sq[0].device),
        torch.zeros(feats[1].shape, dtype=work, device=sq[0].device),
    )
    d_sigma = torch.zeros((), dtype=work, device=sq[0].device)
    sums = []
    terms = zip(_term_strips(strips, feats, group), KERNEL_TERMS, strict=True)
    for k, ((i, j, r, c, sym, rows), (_, _, coef)) in enumerate(terms):
        off = float(log_z[k]) if log_z is not None else cast(list[float], offsets)[k]
        da, db, dot, total = kernel_term_grads(
            strips.backend, feats[i][r], feats[j][c], sq[i][r], sq[j][c], inv_s2, off, 1.0, sym, want_sigma,
            log_z is None, rows, work,
        )  # fmt: skip
        # symmetric strips: half the pairs (+ log 2) and W + W^T in the gradient (x 2)
        lz = log_z[k] if log_z is not None else all_logsumexp(total.log() + off + (LOG2 if sym else 0.0), group)
        f = coef * math.exp(off - float(lz)) * (2.0 if sym else 1.0)
        _add_term_grads(grads, i, j, r, c, da.mul_(f), None if db is None else db.mul_(f))
        d_sigma += dot * f
        sums.append(lz)
    return torch.stack(sums), (grads[0], grads[1], d_sigma)


def _add_term_grads(
    grads: tuple[Tensor, Tensor], i: int, j: int, r: slice, c: slice, da: Tensor, db: Tensor | None
) -> None:
    """Add one kernel term's `kernel_term_grads` result into the pools' gradients: a symmetric term's
    single result covers its columns (rows from the share's first on), a cross term's two cover
    this rank's rows of pool i and all of pool j."""
    if db is None:
        grads[i][c] += da
    else:
        grads[i][r] += da
        grads[j].add_(db)


def _rows(strips: Strips, n_rows: int, n_cols: int) -> int:
    return strips.chunk_size or max(MIN_STRIP_ROWS, strip_rows(n_rows, n_cols, DEFAULT_STRIP_ELEMENTS))


def sharded_infonce_cs(
    x: Tensor,
    y: Tensor,
    x_all: Tensor,
    y_all: Tensor,
    temperature: float | Tensor,
    sigma: float | Tensor,
    text_to_image: Tensor | None,
    *,
    with_cs: bool,
    strips: Strips,
    group: Any = None,
) -> dict[str, Tensor]:
    """`infonce_cs_terms(..., shard=True)`: the global batch on every rank, rows split between ranks.

    Args:
        x, y, x_all, y_all, temperature, sigma, text_to_image, with_cs: as in `infonce_cs_terms`,
            and the same on every rank (the gathered global batch).
        strips: the strip backend, operand dtype, centring and chunk size to use.
        group: the process group (default: the world); must be initialised.

    Returns:
        {"infonce", "cs" (when with_cs)}: the single-process values, on every rank.
    """
    for name, t in (("x", x), ("y", y), ("x_all", x_all), ("y_all", y_all)):
        check_features(name, t)
    check_same_dim("x", x, "y", y)
    check_same_dim("x_all", x_all, "y_all", y_all)
    check_positive("temperature", temperature)
    check_positive("sigma", sigma)
    work = compute_dtype(x, y, x_all, y_all)
    pos_row, pos_w = positives(x.shape[0], y.shape[0], text_to_image, x.device, work)
    op = strips.operand or work
    xn, yn = (F.normalize(t.to(work), dim=-1).to(op).contiguous() for t in (x, y))
    xa, ya = (x_all.to(work), y_all.to(work)) if with_cs else (xn, yn)  # the latter unused
    if with_cs and strips.center:  # D_CS is translation invariant; as in streamed_cs_divergence
        c = torch.cat([xa, ya]).mean(0).detach()
        xa, ya = xa - c, ya - c
    scale = 1.0 / as_tensor(temperature, work, x.device)
    sig = as_tensor(sigma, work, x.device)
    xa, ya = xa.to(op).contiguous(), ya.to(op).contiguous()
    eager = torch.is_grad_enabled() and (xa.requires_grad or ya.requires_grad)
    nce, cs = _ShardedInfoNCECS.apply(xn, yn, xa, ya, scale, sig, pos_row, pos_w, strips, with_cs, eager, group)
    return {"infonce": nce, "cs": cs} if with_cs else {"infonce": nce}


__all__ = ["all_logsumexp", "sharded_infonce_cs", "share"]
