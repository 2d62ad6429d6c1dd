"""The fused loss's per-tile partial sums: `Tensor.sum(0)` against the Triton reduction, in one run (CUDA).

    python benchmarks/partial_sums.py --n 65536

Each strip kernel writes small float32 partial buffers (a row partial per column tile, a column
partial per row tile) that the host adds over their first dimension (`triton_strips.sum_partials`).
This times both ways on the buffer shapes of one 65k step (strips of 4096 rows, 128-wide tiles:
(512, 4096) row partials, (32, 65536) column partials, and the symmetric strips' narrower ones),
then the whole forward + backward step with `PARTIAL_SUMS` = "torch" and = "triton", and prints
the ratios. The default stays "torch" until this shows the kernel faster.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tune_tiles import timed  # this folder (sys.path[0] when run as a script)

from csaligner.kernels import triton_strips
from csaligner.kernels.fused import fused_infonce_cs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    tiles = a.n // 128
    shapes = [(tiles, a.rows), (a.rows // 128, a.n), (tiles // 4, a.rows), (a.rows // 128, a.n // 4)]
    print(f"{torch.cuda.get_device_name()}; partial buffers, float32, microseconds per sum ({a.repeats * 20} calls)")
    print("| shape | torch | triton | triton / torch |")
    print("|---|---:|---:|---:|")
    for shape in shapes:
        part = torch.randn(shape, device="cuda")
        out = torch.empty(shape[1], device="cuda")
        times = {}
        for mode in ("torch", "triton"):
            triton_strips.PARTIAL_SUMS = mode
            torch.testing.assert_close(triton_strips.sum_partials(part), part.sum(0), rtol=1e-5, atol=1e-4)
            call = functools.partial(triton_strips.sum_partials, part, out, accumulate=True)
            times[mode] = timed(call, a.repeats * 20) * 1e3
        print(f"| {shape} | {times['torch']:.1f} | {times['triton']:.1f} | {times['triton'] / times['torch']:.2f}x |")
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().bfloat16().requires_grad_()
    y = F.normalize(x.detach().float().cpu() + 0.5 * torch.randn(a.n, a.dim, generator=g), dim=-1)
    y = y.cuda().bfloat16().requires_grad_()

    def step() -> None:
        nce, cs = fused_infonce_cs(x, y, 0.05, 0.5, chunk_size=a.rows)
        torch.autograd.grad(nce + 0.01 * cs, [x, y])

    steps = {}
    for mode in ("torch", "triton", "torch", "triton"):  # twice each, alternating: the card warms up
        triton_strips.PARTIAL_SUMS = mode
        steps.setdefault(mode, []).append(timed(step, a.repeats))
    print(f"N = {a.n}, D = {a.dim}, bf16, forward + backward ms (alternating runs of {a.repeats}):")
    for mode, ms in steps.items():
        print(f"  {mode}: " + ", ".join(f"{t:.1f}" for t in ms))
    ratio = min(steps["triton"]) / min(steps["torch"])
    print(f"triton / torch, best of each: {ratio:.3f}x")


if __name__ == "__main__":
    main()
