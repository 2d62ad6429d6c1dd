"""Triton tile kernels for the strip backend of `csaligner.kernels.strips` (CUDA, or the interpreter).

Each kernel handles (BLOCK_M, BLOCK_N) tiles of a strip's logits, one tile per program or, with
a persistent grid (`TritonStrips.programs_per_sm`), a few programs per multiprocessor that loop
over the tiles. A tile's dot products come from a K loop (fp32 accumulator, bf16/fp16 tensor
cores for half inputs; operand tiles read through tensor descriptors where the device has the
bulk copy engine), and then

* forward, InfoNCE: the tile's row and column log-sum-exp (max + sum of exp, i.e. one online step)
  go to small partial buffers (S x M/BLOCK_N and S/BLOCK_M x M), merged with `logsumexp`;
* forward, kernel terms: one scalar per tile, a plain sum of exps when every logit is known to lie
  within 80 nats of 0 (the caller takes the log), else a log-sum-exp;
* backward: the tile of weights dL/dlogit (softmax minus positives, or the kernel's softmax) is
  written to the (S, M) strip, plus a per-tile partial of sum(weight * logit) for the gradient of
  the temperature / bandwidth. cuBLAS then applies the strip with two matmuls (N x D gradients),
  which keeps any feature dimension D efficient without holding a (BLOCK_M, D) accumulator.

Logits are formed in base 2 (log2(e) folded into the per-row and per-column vectors and scalars
the host passes), so that each exp is a single MUFU.EX2 (`_exp2`); sizes that are multiples of the
tile compile without any masks (EVEN). Weight strips can be written through tensor descriptors
(`TritonStrips.tma_store`). docs/BENCHMARKS.md has the measurements behind each of these.

The symmetric XX^T and YY^T terms compute only the tiles on or above the diagonal: tiles below
it skip their dot products (zero weights, neutral partials), diagonal tiles are weighted 1/2
(-log 2; see `StripBackend`). Tiles are ordered in groups of GROUP_M tile rows so consecutive
programs reuse the same column tiles from L2.

Import is lazy (only `impl="triton"` imports this module). With TRITON_INTERPRET=1 set before the
first import, the kernels run on CPU tensors in Triton's interpreter, which is how the tests check
them without a GPU. The interpreter mis-evaluates tl.dot on bfloat16 operands, so there half
operands are upcast to float32 inside the kernel (a flag; the GPU path keeps the tensor cores).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_FTZ_EXP2 = tl.constexpr(not INTERPRETING)
_INTERPRETER_RTNE = tl.constexpr(INTERPRETING)
_LN2 = tl.constexpr(LN2)  # for the kernels (Triton reads constexpr globals only)


@triton.jit
def _tile_coords(pid, n_tm, n_tn, GROUP_M: tl.constexpr):
    """Tile `pid` in grouped order: GROUP_M tile rows are swept together, column by column (L2 reuse)."""
    width = GROUP_M * n_tn
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_tm - first_m, GROUP_M)
    tm = first_m + (pid % width) % size_m
    tn = (pid % width) // size_m
    return tm, tn


@triton.jit
def _tile_span(pid, n_tm, n_tn, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile `pid`'s coordinates (grouped order) and its row and column indices."""
    tm, tn = _tile_coords(pid, n_tm, n_tn, GROUP_M)
    return tm, tn, tm * BM + tl.arange(0, BM), tn * BN + tl.arange(0, BN)


@triton.jit
def _dot_tile(
    A,
    B,
    r0,
    c0,
    n_a,
    n_b,
    dim,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """(BM, BN) float32 tile of A[r0:r0+BM] @ B[c0:c0+BN].T for row-major (., dim) A and B.

    With TMA, A and B are tensor descriptors of (BM, BK) and (BN, BK) blocks (the Hopper bulk copy
    engine; rows past the end read as zeros); otherwise plain pointers with masked loads.
    """
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    for k0 in range(0, dim, BK):
        if TMA:
            a = A.load([r0, k0])
            b = B.load([c0, k0]).T
        else:
            ks = k0 + tl.arange(0, BK)
            a = tl.load(
                A + rows[:, None] * dim + ks[None, :], mask=(rows[:, None] < n_a) & (ks[None, :] < dim), other=0.0
            )
            b = tl.load(
                B + cols[None, :] * dim + ks[:, None], mask=(cols[None, :] < n_b) & (ks[:, None] < dim), other=0.0
            )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _exp2(x):
    """2^x: on CUDA libdevice's flush-to-zero form, one MUFU.EX2 (results below 2^-126 become 0;
    tl.exp2 spends four more instructions per element on subnormal results). tl.exp2 in the
    interpreter, which has no libdevice."""
    if _FTZ_EXP2:
        return libdevice.exp2(x)
    else:
        return tl.exp2(x)


@triton.jit
def _lse2(t, AXIS: tl.constexpr):
    """log2-sum-exp2 along AXIS; rows that are all -inf give -inf (not NaN)."""
    m = tl.max(t, AXIS)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(_exp2(t - tl.expand_dims(m, AXIS)), AXIS)
    return tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _valid(rows, cols, n_a, n_b):
    return (rows[:, None] < n_a) & (cols[None, :] < n_b)


@triton.jit
def _kernel_logits2(
    A, B, U2, V2, tm, tn, n_a, n_b, dim, c2, off2,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """log2(e) * (min(0, -||a - b||^2 / (2 sigma^2)) + offset), as min(a.b c2 + u2 + v2 + off2, off2):
    U2, V2 are the squared-norm terms times log2(e) and c2 = log2(e) / sigma^2 (base-2 logits, so
    that each exp is one MUFU.EX2 with no multiply)."""
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    dot = _dot_tile(A, B, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA)
    u2 = tl.load(U2 + rows, mask=rows < n_a, other=0.0) + off2
    v2 = tl.load(V2 + cols, mask=cols < n_b, other=0.0)
    return tl.minimum(dot * c2 + u2[:, None] + v2[None, :], off2)


@triton.jit
def _to(v, dtype: tl.constexpr):
    """v.to(dtype), rounded to nearest even as on a GPU: the interpreter (Triton 3.9) truncates float32
    to bfloat16 whatever the rounding mode asked, so it rounds the bits first there (compiled code
    never takes that branch)."""
    if _INTERPRETER_RTNE and dtype == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        top = tl.where(v != v, (bits >> 16) | 0x40, rounded)  # NaNs stay NaN (a carry could make them inf)
        return top.to(tl.uint16).to(dtype, bitcast=True)  # the bits themselves: subnormals too
    return v.to(dtype)


@triton.jit
def _cast_out(OUT, v, STORE_TMA: tl.constexpr):
    """v in the element type of OUT, a pointer or (STORE_TMA) a tensor descriptor."""
    if STORE_TMA:
        return _to(v, OUT.dtype)
    else:
        return _to(v, OUT.dtype.element_ty)


@triton.jit
def _column_halves(v, BM: tl.constexpr, BN: tl.constexpr):
    """(left, right): the (BM, BN / 2) column halves of a (BM, BN) tile."""
    return tl.split(tl.permute(tl.reshape(v, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def _column_blocks(v, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """The SPLIT (1, 2 or 4) column blocks (BM, BN / SPLIT) of a (BM, BN) tile, left to right, as a tuple."""
    if SPLIT == 1:
        blocks = (v,)
    elif SPLIT == 2:
        blocks = _column_halves(v, BM, BN)
    else:
        tl.static_assert(SPLIT == 4, "SPLIT is 1, 2 or 4")
        left, right = _column_halves(v, BM, BN)
        blocks = _column_halves(left, BM, BN // 2) + _column_halves(right, BM, BN // 2)
    return blocks


@triton.jit
def _store_tile(OUT, v, tm, tn, n_a, n_b, BM: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr,
                STORE_TMA: tl.constexpr, SPLIT: tl.constexpr = 1):  # fmt: skip
    """Write a (BM, BN) tile of a row-major (n_a, n_b) strip: through the bulk copy engine (STORE_TMA:
    one store of the staged tile, or SPLIT stores of its column blocks, one after the other, whose
    staging buffer is BN / SPLIT wide: OUT is then a descriptor of such blocks), else per thread,
    masked at the edges unless EVEN."""
    if STORE_TMA:
        blocks = _column_blocks(v, BM, BN, SPLIT)
        for i in tl.static_range(SPLIT):
            OUT.store([tm * BM, tn * BN + i * (BN // SPLIT)], blocks[i])
    else:
        rows = tm * BM + tl.arange(0, BM)
        cols = tn * BN + tl.arange(0, BN)
        if EVEN:
            tl.store(OUT + rows[:, None] * n_b + cols[None, :], v)
        else:
            tl.store(OUT + rows[:, None] * n_b + cols[None, :], v, mask=_valid(rows, cols, n_a, n_b))


@triton.jit
def _diagonal_log2_weight(tm, tn, SYMMETRIC: tl.constexpr):
    """log2 of a tile's weight: -1 (a half) for a symmetric term's diagonal tiles, else 0."""
    log_w2 = 0.0
    if SYMMETRIC:
        log_w2 = tl.where(tn == tm, -1.0, 0.0)
    return log_w2


@triton.jit
def _below_diagonal(tm, tn, SYMMETRIC: tl.constexpr):
    """True for the tiles a symmetric term skips (its mirror above the diagonal counts them)."""
    below = tn < tm
    if not SYMMETRIC:
        below = tn < 0
    return below


@triton.jit
def _logits_lse_tile(
    pid,
    A, B, ROW_PART, COL_PART, n_a, n_b, dim, scale2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    t = _dot_tile(A, B, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA) * scale2  # log2 units
    if not EVEN:
        t = tl.where(_valid(rows, cols, n_a, n_b), t, float("-inf"))
    tl.store(ROW_PART + tn * n_a + rows, _lse2(t, 1) * _LN2, mask=rows < n_a)
    tl.store(COL_PART + tm * n_b + cols, _lse2(t, 0) * _LN2, mask=cols < n_b)


@triton.jit
def _logits_lse_kernel(
    A, B, ROW_PART, COL_PART, n_a, n_b, dim, scale2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _logits_lse_tile(pid, A, B, ROW_PART, COL_PART, n_a, n_b, dim, scale2, n_tm, n_tn, BM, BN, BK, GROUP_M,
                PREC, UPCAST, TMA, EVEN)  # fmt: skip
    else:
        _logits_lse_tile(tl.program_id(0), A, B, ROW_PART, COL_PART, n_a, n_b, dim, scale2, n_tm, n_tn, BM, BN, BK,
            GROUP_M, PREC, UPCAST, TMA, EVEN)  # fmt: skip


@triton.jit
def _logits_grad_tile(
    pid,
    A, B, ROW_LSE2, COL_LSE2, POS_ROW, POS_W, G, DOT_PART, n_a, n_b, dim, scale2, w_row, w_col, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    t = _dot_tile(A, B, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA) * scale2  # log2 units
    r_lse2 = tl.load(ROW_LSE2 + rows, mask=rows < n_a, other=0.0)
    c_lse2 = tl.load(COL_LSE2 + cols, mask=cols < n_b, other=0.0)
    pos_row = tl.load(POS_ROW + cols, mask=cols < n_b, other=-1)
    pos_w = tl.load(POS_W + cols, mask=cols < n_b, other=0.0)
    g = w_row * _exp2(t - r_lse2[:, None]) + w_col * _exp2(t - c_lse2[None, :])
    g -= tl.where(rows[:, None] == pos_row[None, :], pos_w[None, :], 0.0)  # positives folded in
    if not EVEN:
        g = tl.where(_valid(rows, cols, n_a, n_b), g, 0.0)
    g = g.to(G.dtype.element_ty)
    _store_tile(G, g, tm, tn, n_a, n_b, BM, BN, EVEN, False)
    tl.store(DOT_PART + tm * n_tn + tn, tl.sum(tl.sum(g.to(tl.float32) * t, 1), 0) * _LN2)


@triton.jit
def _logits_grad_kernel(
    A, B, ROW_LSE2, COL_LSE2, POS_ROW, POS_W, G, DOT_PART, n_a, n_b, dim, scale2, w_row, w_col, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _logits_grad_tile(pid, A, B, ROW_LSE2, COL_LSE2, POS_ROW, POS_W, G, DOT_PART, n_a, n_b, dim, scale2,
                w_row, w_col, n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, EVEN)  # fmt: skip
    else:
        _logits_grad_tile(tl.program_id(0), A, B, ROW_LSE2, COL_LSE2, POS_ROW, POS_W, G, DOT_PART, n_a, n_b, dim,
            scale2, w_row, w_col, n_tm, n_tn, BM, BN, BK, GROUP_M, PREC, UPCAST, TMA, EVEN)  # fmt: skip


@triton.jit
def _kernel_lse_tile(
    pid,
    A, B, U2, V2, TILE_PART, n_a, n_b, dim, c2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    if _below_diagonal(tm, tn, SYMMETRIC):
        tl.store(TILE_PART + tm * n_tn + tn, 0.0 if BOUNDED else float("-inf"))
    else:
        t = _kernel_logits2(A, B, U2, V2, tm, tn, n_a, n_b, dim, c2, 0.0, BM, BN, BK, PREC, UPCAST, TMA)
        if not EVEN:
            t = tl.where(_valid(rows, cols, n_a, n_b), t, float("-inf"))
        if BOUNDED:  # all logits in [-80, 0] nats: no max offset; a linear sum (the caller takes the log)
            part = tl.sum(tl.sum(_exp2(t), 1), 0) * tl.exp2(_diagonal_log2_weight(tm, tn, SYMMETRIC))
        else:
            part = (_lse2(tl.reshape(t, (BM * BN,)), 0) + _diagonal_log2_weight(tm, tn, SYMMETRIC)) * _LN2
        tl.store(TILE_PART + tm * n_tn + tn, part)


@triton.jit
def _kernel_lse_kernel(
    A, B, U2, V2, TILE_PART, n_a, n_b, dim, c2, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
    BOUNDED: tl.constexpr,
):  # fmt: skip
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _kernel_lse_tile(pid, A, B, U2, V2, TILE_PART, n_a, n_b, dim, c2, n_tm, n_tn, BM, BN, BK, GROUP_M,
                SYMMETRIC, PREC, UPCAST, TMA, EVEN, BOUNDED)  # fmt: skip
    else:
        _kernel_lse_tile(tl.program_id(0), A, B, U2, V2, TILE_PART, n_a, n_b, dim, c2, n_tm, n_tn, BM, BN, BK,
            GROUP_M, SYMMETRIC, PREC, UPCAST, TMA, EVEN, BOUNDED)  # fmt: skip


@triton.jit
def _kernel_grad_tile(
    pid,
    A, B, U2, V2, W, ROW_PART, COL_PART, DOT_PART, TOTAL_PART, n_a, n_b, dim, c2, neg_lz2, g, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr,
    WANT_DOT: tl.constexpr, WANT_TOTAL: tl.constexpr, STORE_TMA: tl.constexpr, UNIT_G: tl.constexpr,
    SPLIT: tl.constexpr, MIRROR: tl.constexpr,
):  # fmt: skip
    tm, tn, rows, cols = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
    if _below_diagonal(tm, tn, SYMMETRIC):  # no dot products: zeros for the GEMMs, or (MIRROR) nothing
        if not MIRROR:  # with MIRROR the tile above the diagonal writes this one, transposed
            zeros = _cast_out(W, tl.zeros((BM, BN), tl.float32), STORE_TMA)
            _store_tile(W, zeros, tm, tn, n_a, n_b, BM, BN, EVEN, STORE_TMA, SPLIT)
        tl.store(ROW_PART + tn * n_a + rows, tl.zeros((BM,), tl.float32), mask=rows < n_a)
        tl.store(COL_PART + tm * n_b + cols, tl.zeros((BN,), tl.float32), mask=cols < n_b)
        tl.store(DOT_PART + tm * n_tn + tn, 0.0)
        tl.store(TOTAL_PART + tm * n_tn + tn, 0.0)
    else:
        # log2(w_tile) - log_z log2(e); MIRROR stores diagonal tiles whole (the strip's diagonal block
        # is then the full symmetric block) and halves only their sums below.
        off2 = neg_lz2 + _diagonal_log2_weight(tm, tn, SYMMETRIC and not MIRROR)
        t = _kernel_logits2(A, B, U2, V2, tm, tn, n_a, n_b, dim, c2, off2, BM, BN, BK, PREC, UPCAST, TMA)
        w = _exp2(t) if UNIT_G else g * _exp2(t)  # UNIT_G: g == 1, one multiply per weight less
        if not EVEN:
            w = tl.where(_valid(rows, cols, n_a, n_b), w, 0.0)
        stored = _cast_out(W, w, STORE_TMA)
        _store_tile(W, stored, tm, tn, n_a, n_b, BM, BN, EVEN, STORE_TMA, SPLIT)
        # Sums of the weights as stored (rounded): the caller's W b - rowsum(W) a then cancels exactly.
        w_st = stored.to(tl.float32)
        if not MIRROR:  # as before MIRROR came, to the instruction (sm_90a: 32 bytes of stack, not 120)
            tl.store(ROW_PART + tn * n_a + rows, tl.sum(w_st, 1), mask=rows < n_a)
            tl.store(COL_PART + tm * n_b + cols, tl.sum(w_st, 0), mask=cols < n_b)
            if WANT_DOT:  # the natural logit is (t - off2) ln 2
                tl.store(DOT_PART + tm * n_tn + tn, tl.sum(tl.sum(w * (t - off2), 1), 0) * _LN2)
            if WANT_TOTAL:  # the unrounded sum: a one-pass forward's value
                tl.store(TOTAL_PART + tm * n_tn + tn, tl.sum(tl.sum(w, 1), 0))
        else:
            col_sums = tl.sum(w_st, 0)
            half = 1.0
            if tn == tm:  # whole: its rows' sums are all of it; nothing is applied through W^T
                col_sums = tl.zeros((BN,), tl.float32)
                half = 0.5
            tl.store(ROW_PART + tn * n_a + rows, tl.sum(w_st, 1), mask=rows < n_a)
            tl.store(COL_PART + tm * n_b + cols, col_sums, mask=cols < n_b)
            if WANT_DOT:
                tl.store(DOT_PART + tm * n_tn + tn, tl.sum(tl.sum(w * (t - off2), 1), 0) * (_LN2 * half))
            if WANT_TOTAL:
                tl.store(TOTAL_PART + tm * n_tn + tn, tl.sum(tl.sum(w, 1), 0) * half)
        if MIRROR:  # noqa: SIM102
            # Last, as the weights' other uses are done: fewer registers live across this store (sm_90a:
            # 88 bytes of stack instead of 808 with it beside the first store; 32 without MIRROR).
            if (tn > tm) & (tn < n_tm):  # in the strip's diagonal block: the transpose goes below the
                # diagonal, whose rows' sums are this tile's column sums (the caller adds both per row)
                stored_t = tl.trans(_cast_out(W, w, STORE_TMA))
                _store_tile(W, stored_t, tn, tm, n_a, n_b, BM, BN, EVEN, STORE_TMA, SPLIT)


@triton.jit
def _kernel_grad_kernel(
    A, B, U2, V2, W, ROW_PART, COL_PART, DOT_PART, TOTAL_PART, n_a, n_b, dim, c2, neg_lz2, g, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
    WANT_DOT: tl.constexpr, WANT_TOTAL: tl.constexpr, STORE_TMA: tl.constexpr, UNIT_G: tl.constexpr = False,
    SPLIT: tl.constexpr = 1, MIRROR: tl.constexpr = False,
):  # fmt: skip
    """SPLIT: the weight tile goes out through the copy engine in that many column blocks (`_store_tile`).
    MIRROR (SYMMETRIC only): the strip's diagonal block is stored as the full symmetric block (see
    `TritonStrips.mirror_diagonal`)."""
    if FLATTEN:  # persistent: loop over tiles; the next tile's loads overlap this one's epilogue
        for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
            _kernel_grad_tile(pid, A, B, U2, V2, W, ROW_PART, COL_PART, DOT_PART, TOTAL_PART, n_a, n_b, dim, c2,
                neg_lz2, g, n_tm, n_tn, BM, BN, BK, GROUP_M, SYMMETRIC, PREC, UPCAST, TMA, EVEN, WANT_DOT,
                WANT_TOTAL, STORE_TMA, UNIT_G, SPLIT, MIRROR)  # fmt: skip
    else:
        _kernel_grad_tile(tl.program_id(0), A, B, U2, V2, W, ROW_PART, COL_PART, DOT_PART, TOTAL_PART, n_a, n_b, dim,
            c2, neg_lz2, g, n_tm, n_tn, BM, BN, BK, GROUP_M, SYMMETRIC, PREC, UPCAST, TMA, EVEN, WANT_DOT,
            WANT_TOTAL, STORE_TMA, UNIT_G, SPLIT, MIRROR)  # fmt: skip


@triton.jit
def _sum_rows_kernel(P, OUT, p, cols_total, ACCUMULATE: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr):
    """OUT[l] (+)= sum_i P[i, l] over BL columns of a row-major float32 (p, cols_total) array: each program
    adds its column block's rows BP at a time, in a fixed order (the same bits on every run)."""
    cols = tl.program_id(0) * BL + tl.arange(0, BL)
    ok = cols < cols_total
    acc = tl.zeros((BL,), tl.float32)
    for i0 in range(0, p, BP):
        rows = i0 + tl.arange(0, BP)
        at = P + rows[:, None].to(tl.int64) * cols_total + cols[None, :]
        block = tl.load(at, mask=(rows < p)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(block, 0)
    if ACCUMULATE:
        acc += tl.load(OUT + cols, mask=ok, other=0.0)
    tl.store(OUT + cols, acc, mask=ok)
