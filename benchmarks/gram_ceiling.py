"""How far the Gram kernels are from their own dot-product loop: one strip, kernel by kernel (CUDA).

    python benchmarks/gram_ceiling.py --n 65536 --rows 4096 --dim 1024

Times, on one strip of `--rows` rows of X against all N rows of Y (bf16, unit norm):

* the bare tile loop ("mainloop"): the kernels' own K loop (`_dot_tile`, same grid and loads)
  whose epilogue is a single row sum, under each `--spec` tile setting: the ceiling the
  epilogues are measured against;
* cuBLAS on the same product (bf16 and float32 output);
* the three Gram kernels of the fused loss with their default tiles: the forward X Y^T kernel,
  the backward X Y^T kernel (with its partial sums), and the kernel-weight kernel.

Each line prints ms per strip, the TFLOP/s of the strip's 2 rows N D products, and the time of a
whole N x N Gram matrix at that rate. With TRITON_INTERPRET=1 it runs on CPU at toy sizes (a
check of the code path, not a timing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_tiles import parse_tiles

from csaligner.kernels.fused import _norm_terms
from csaligner.kernels.fused_kernels import (
    BACKWARD_PAIR_TILES,
    FORWARD_PAIR_TILES,
    SYMMETRIC_TILES,
    _pair_grad,
    _pair_lse_kernel,
)
from csaligner.kernels.triton_kernels import INTERPRETING, LOG2E, _dot_tile, _tile_span


@triton.jit
def _mainloop_kernel(
    A, B, OUT, n_a, n_b, dim, n_tm, n_tn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """The Gram kernels' tile loop with the cheapest epilogue that keeps the products live."""
    for pid in tl.range(tl.program_id(0), n_tm * n_tn, tl.num_programs(0), flatten=True):
        tm, tn, rows, _ = _tile_span(pid, n_tm, n_tn, BM, BN, GROUP_M)
        acc = _dot_tile(A, B, tm * BM, tn * BN, n_a, n_b, dim, BM, BN, BK, PREC, UPCAST, TMA)
        tl.store(OUT + tn * n_a + rows, tl.sum(acc, 1), mask=rows < n_a)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """ms per call (CUDA events), after one untimed call that also compiles."""
    fn()
    if INTERPRETING:
        return float("nan")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--rows", type=int, default=4096, help="rows of the strip (a multiple of 128)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--spec",
        action="append",
        default=None,
        help="tile setting of the bare loop, as in tune_tiles.py (default: four settings)",
    )
    a = p.parse_args()
    specs = a.spec or ["128x128x64:w8:s4:tma:p1", "128x128x64:w4:s3:tma:p2", "128x128x32:w4:s4:tma:p2",
                       "128x256x64:w8:s3:tma:p1"]  # fmt: skip
    device = "cpu" if INTERPRETING else "cuda"
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).to(device, torch.bfloat16)
    y = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).to(device, torch.bfloat16)
    xs, s_rows = x[: a.rows], a.rows
    flop = 2.0 * s_rows * a.n * a.dim
    name = "interpreter" if INTERPRETING else torch.cuda.get_device_name()
    print(f"strip {s_rows} x {a.n}, D = {a.dim}, bf16, {name}")

    def report(label: str, ms: float) -> None:
        rate, gram = flop / ms / 1e9, ms * a.n / s_rows
        print(f"{label:52s} {ms:8.3f} ms  {rate:7.1f} TFLOP/s  {gram:7.1f} ms per Gram", flush=True)

    for spec in specs:
        t = parse_tiles(spec)
        n_tm, n_tn = t._tiles(xs, y)
        out = torch.empty((n_tn, s_rows), device=device)
        report(f"mainloop {spec}", timed(lambda t=t, out=out: t._launch(_mainloop_kernel, xs, y, out), a.repeats))
    if not INTERPRETING:
        report("cuBLAS x @ y.T, bf16 out", timed(lambda: torch.mm(xs, y.T), a.repeats))
        report("cuBLAS x @ y.T, float32 out", timed(lambda: torch.mm(xs, y.T, out_dtype=torch.float32), a.repeats))

    # The fused loss's kernels (temperature 0.07, sigma 0.5: the one-exp and bounded paths).
    s, inv_s2 = 1 / 0.07, 4.0
    (rho, hx), (kappa, hy) = _norm_terms(x), _norm_terms(y)
    r2, u2, v2 = rho * (s * LOG2E), hx * (-inv_s2 * LOG2E), hy * (-inv_s2 * LOG2E)
    fwd = FORWARD_PAIR_TILES
    n_tm, n_tn = fwd._tiles(xs, y)
    row_part = torch.empty((n_tn, s_rows), device=device)
    col_part = torch.empty((n_tm, a.n), device=device)
    k_part = torch.empty(n_tm * n_tn, device=device)
    lse_args = (xs, y, r2[:s_rows], kappa, u2[:s_rows], v2, row_part, col_part, k_part)

    def forward() -> None:
        fwd._launch(_pair_lse_kernel, *lse_args, scalars=(s * LOG2E, inv_s2 * LOG2E), ONE_EXP=True, K_BOUNDED=True)

    report("forward X Y^T (FORWARD_PAIR_TILES)", timed(forward, a.repeats))
    row_a = torch.full((s_rows,), 1e-9, device=device)
    col_b = torch.full((a.n,), 1e-9, device=device)
    positives = (torch.arange(a.n, device=device, dtype=torch.int32), torch.full((a.n,), 1e-5, device=device))
    grad_args = (xs, y, r2[:s_rows], rho[:s_rows], kappa, u2[:s_rows], v2, row_a, col_b, *positives)
    scalars = (s, s * LOG2E, inv_s2 * LOG2E, 0)
    grad_scalars = torch.tensor([-20.0 * LOG2E, -0.02 * inv_s2, 1e-5, 1e-5], device=device)

    def backward() -> None:  # the first strip: positives on its diagonal tiles
        _pair_grad(BACKWARD_PAIR_TILES, *grad_args, scalars, grad_scalars, True, False, True)

    report("backward X Y^T (BACKWARD_PAIR_TILES)", timed(backward, a.repeats))

    def kernel_weights() -> None:
        SYMMETRIC_TILES.kernel_grad(xs, y, -hx[:s_rows] * inv_s2, -hy * inv_s2, inv_s2, 0.0, 1.0, False, False, True)

    report("kernel weights, rectangular (SYMMETRIC_TILES)", timed(kernel_weights, a.repeats))


if __name__ == "__main__":
    main()
