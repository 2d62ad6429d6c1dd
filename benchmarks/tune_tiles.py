"""Tile configurations of the fused Triton loss, timed against each other in one run (CUDA).

    python benchmarks/tune_tiles.py --n 32768 --dim 1024

Each row is one `TritonStrips` setting: forward and forward + backward of InfoNCE + 0.01 D_CS
through `fused_infonce_cs`, mean of --repeats calls after one warm-up (which also compiles), and
the ratio to the first (default) setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import TRITON_STRIP_BYTES
from csaligner.kernels.chunked import strip_rows
from csaligner.kernels.fused import fused_infonce_cs
from csaligner.kernels.triton_kernels import TritonStrips

CONFIGS = [  # (block, block_k, num_warps, num_stages, group_m); the first is the default
    (128, 64, 8, 3, 8),
    (128, 64, 8, 4, 8),
    (128, 32, 8, 4, 8),
    (128, 64, 4, 3, 8),
    (128, 128, 8, 2, 8),
    (64, 64, 4, 4, 8),
]


def timed(fn: object, repeats: int) -> float:
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().bfloat16().requires_grad_()
    y = F.normalize(x.detach().float().cpu() + 0.5 * torch.randn(a.n, a.dim, generator=g), dim=-1)
    y = y.cuda().bfloat16().requires_grad_()
    print(f"N = {a.n}, D = {a.dim}, bf16, {torch.cuda.get_device_name()}")
    print("| block | block_k | warps | stages | group_m | forward ms | fwd + bwd ms | vs default |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = None
    for block, bk, warps, stages, group in CONFIGS:
        tiles = TritonStrips(block, block, bk, group, warps, stages)
        rows = strip_rows(a.n, a.n, TRITON_STRIP_BYTES // 2, block)

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return fused_infonce_cs(x, y, 0.07, 0.5, tiles=tiles, chunk_size=rows)  # noqa: B023

        def step() -> None:
            nce, cs = forward()
            (nce + 0.01 * cs).backward()

        try:
            with torch.no_grad():
                fwd = timed(forward, a.repeats)
            both = timed(step, a.repeats)
        except Exception as err:  # a setting that does not fit (shared memory, registers)
            print(f"| {block} | {bk} | {warps} | {stages} | {group} | {type(err).__name__} | | |")
            continue
        first = first or both
        print(f"| {block} | {bk} | {warps} | {stages} | {group} | {fwd:.1f} | {both:.1f} | {both / first:.2f}x |")


if __name__ == "__main__":
    main()
