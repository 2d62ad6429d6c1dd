"""InfoNCE in O((N + M) * chunk) memory: strips of rows, O(N + M) statistics, recompute in backward.

Every strip covers whole rows of the (N, M) logits, so its row log-sum-exps are exact; the column
log-sum-exps are merged across strips as (max, log-sum minus max) pairs (`NceSplit`), and the
positives' logits are gathered from the strips that computed them, so that a loss near 0 is a
difference of equal floats plus a small log-sum (`nce_value_terms`). The backward pass recomputes
each strip's logits, turns them into weights dL/dlogit (a (chunk, M) strip, never (N, M)) and
applies them with two matmuls. The strip arithmetic is a `StripBackend` (`csaligner.kernels.strips`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner._validation import check_chunk_size, check_features, check_positive, check_same_dim, checks_finite_once
from csaligner.kernels.strips import (
    DEFAULT_STRIP_ELEMENTS,
    MIN_STRIP_ROWS,
    StripBackend,
    TorchStrips,
    as_tensor,
    autocast_off,
    compute_dtype,
    mm_accumulate,
    strip_rows,
)
from csaligner.losses.contrastive import caption_counts, check_text_to_image


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
        # One caption per image: no counts to compute.
        return torch.arange(n, device=device), 0.5 / m + torch.full((n,), 0.5 / n, dtype=work, device=device)
    pos_row = check_text_to_image(text_to_image.to(device), n, m)
    # 1/(2M) for the text -> image cross-entropy, 1/(2 N |P_i|) for image i's captions.
    counts = caption_counts(pos_row, n).to(work)
    return pos_row, 0.5 / m + 0.5 / (n * counts[pos_row])


@checks_finite_once
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
    chunk_size = check_chunk_size(chunk_size)
    n, m = x.shape[0], y.shape[0]
    work = compute_dtype(x, y)
    pos_row, pos_w = positives(n, m, text_to_image, x.device, work)
    xn = F.normalize(x.to(work), dim=-1).to(operand_dtype or work)
    yn = F.normalize(y.to(work), dim=-1).to(operand_dtype or work)
    scale = 1.0 / as_tensor(temperature, work, x.device)
    rows = chunk_size or max(MIN_STRIP_ROWS, strip_rows(n, m, DEFAULT_STRIP_ELEMENTS))
    out: Tensor = _InfoNCE.apply(
        xn.contiguous(), yn.contiguous(), scale, pos_row, pos_w, backend or TorchStrips(), rows
    )
    return out
