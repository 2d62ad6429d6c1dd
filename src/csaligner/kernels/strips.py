"""One strip of rows at a time: the arithmetic behind the O(N * chunk) losses, and its numeric helpers.

A strip is `chunk` rows of an (N, M) matrix of logits, (chunk, M) at most in memory. `StripBackend`
is what the chunked losses (`csaligner.kernels.nce`, `csaligner.kernels.chunked`) and the sharded one
ask of a strip: InfoNCE's row and column log-sum-exps and its weights dL/dlogit, a kernel term's
log-sum-exp and its weights. `TorchStrips` does it with plain torch ops (any device); the Triton
tiles of `csaligner.kernels.triton_kernels` do it on CUDA. The autograd Functions are shared.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

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

    @property
    def mirror_diagonal(self) -> bool:
        """Whether a symmetric `kernel_grad` strip holds its (S, S) diagonal block whole (a backend
        without the attribute: no). Either way the caller applies W to b and adds row_mass to the
        strip's rows and col_mass to b's; with the block whole it applies W^T only to the columns
        past it, and the masses say what each row sees that way (see `kernel_grad`)."""
        ...

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

        symmetric with `mirror_diagonal`: W[:, :S] is the whole symmetric block (weights 1, not 1/2
        and 0), of which the caller applies only W (not W^T); row_mass[i] + col_mass[i] is then the
        stored weight row i of the block sees, and col_mass past the block is as above. sum(W * l)
        and sum(W) still weight the block's pairs as the upper triangle plus half the diagonal.
        """
        ...


class TorchStrips:
    """Strip arithmetic with plain torch ops (CPU or CUDA); tiles are (S, M) in the input dtype."""

    gathers_positives = True
    mirror_diagonal = True
    """The strip computes the diagonal block's lower triangle anyway: whole, it spares the second GEMM
    (an instance may set False: the block halved, applied through W and W^T, as before)."""

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
        s = a.shape[0]
        if not symmetric or not self.mirror_diagonal:
            if symmetric:
                w[:, :s] *= 0.5  # the block counts half, and is applied through W and W^T
            dot = torch.dot(w.flatten(), t.flatten()) if want_dot else None
            row_mass = w.sum(1)
            return KernelStrip(w, row_mass, w.sum(0), dot, row_mass.sum() if want_total else None)
        # The (S, S) block whole (mirror_diagonal): its rows see all of it through W, nothing through W^T.
        row_mass, col_mass = w.sum(1), w.sum(0)
        col_mass[:s] = 0
        block_dot = torch.dot(w[:, :s].flatten(), t[:, :s].flatten()) if want_dot else None
        dot = torch.dot(w.flatten(), t.flatten()) - 0.5 * block_dot if block_dot is not None else None
        total = row_mass.sum() - 0.5 * w[:, :s].sum() if want_total else None  # the block's pairs count half
        return KernelStrip(w, row_mass, col_mass, dot, total)


def autocast_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's forward or backward with autocast off on its tensors' device.

    The strip paths choose their own precision (float32 statistics; half operands only where the
    inputs are half). Under an ambient autocast, matmuls inside would return float16/bfloat16
    logits, and the one-pass weights exp(l - offset) overflow float16. The dense reference turns
    autocast off as well (`csaligner._autocast`), so every path computes the same terms under it.
    """

    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(ctx, *args)
        with torch.autocast(device.type, enabled=False):
            return fn(ctx, *args)

    return wrapper


class HostRead:
    """The values of a small device tensor, on their way to the host.

    On CUDA the copy goes into pinned memory behind an event, queued now; `values()` waits for that
    copy alone, not for the work queued after it. A caller that queues GPU work between the two
    keeps the GPU busy across the read, where `.tolist()` would drain the queue first and leave the
    GPU idle until the host queued its next kernel (on an H100 profile of the fused loss at
    N = 65,536, ~1 ms each time). Elsewhere the values are read at once.
    """

    def __init__(self, t: Tensor) -> None:
        t = t.detach().reshape(-1)
        self._event: torch.cuda.Event | None = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream = torch.cuda.current_stream(t.device)
            with torch.cuda.stream(stream):
                self._host.copy_(t, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(stream)
        else:
            self._host = t.clone()

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return [float(v) for v in self._host.tolist()]


def strip_rows(n_rows: int, n_cols: int, budget: int, multiple: int = 1) -> int:
    """Rows per strip so that rows * n_cols <= budget elements (at least `multiple` rows)."""
    rows = max(multiple, budget // max(n_cols, 1) // multiple * multiple)
    return min(rows, -(-n_rows // multiple) * multiple)


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


def half_sq_norms(a: Tensor, work: torch.dtype) -> Tensor:
    """(N,) |a_i|^2 / 2 in `work` precision."""
    af = a.to(work)
    return 0.5 * (af * af).sum(1)


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 stays float64; bf16, fp16 and fp32 are computed in float32 (as the dense path)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def as_tensor(value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor; a tensor input keeps its autograd graph."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=device)
