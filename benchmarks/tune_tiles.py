"""Tile configurations of the fused Triton loss, timed against each other in one run (CUDA).

    python benchmarks/tune_tiles.py --n 32768 --dim 1024

Each row is one pair of `TritonStrips` settings (the X Y^T kernels, then the symmetric ones):
forward and forward + backward of InfoNCE + 0.01 D_CS through `fused_infonce_cs`, mean of
--repeats calls after one warm-up (which also compiles), and the ratio to the first (default) row.
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

SETTINGS = [  # (X Y^T tiles, X X^T / Y Y^T tiles) as (block_m, block_n, block_k, num_warps, num_stages)
    ((128, 128, 64, 8, 3), (128, 128, 64, 8, 3)),  # the previous default
    ((128, 64, 64, 4, 4), (128, 128, 64, 8, 3)),
    ((128, 64, 64, 4, 3), (128, 128, 64, 8, 4)),
    ((128, 64, 64, 4, 4), (128, 128, 64, 8, 4)),
    ((64, 128, 64, 4, 4), (128, 128, 64, 8, 4)),
    ((128, 64, 32, 4, 5), (128, 128, 64, 8, 4)),
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
    print("| pair tiles (m, n, k, warps, stages) | symmetric tiles | forward ms | fwd + bwd ms | vs default |")
    print("|---|---|---:|---:|---:|")
    first = None
    for pair_cfg, sym_cfg in SETTINGS:
        (pm, pn, pk, pw, ps), (sm, sn, sk, sw, ss) = pair_cfg, sym_cfg
        pair, sym = TritonStrips(pm, pn, pk, 8, pw, ps), TritonStrips(sm, sn, sk, 8, sw, ss)
        rows = strip_rows(a.n, a.n, TRITON_STRIP_BYTES // 2, max(pair.block_m, sym.block_m))

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return fused_infonce_cs(x, y, 0.07, 0.5, tiles=sym, pair_tiles=pair, chunk_size=rows)  # noqa: B023

        def step() -> None:
            nce, cs = forward()
            (nce + 0.01 * cs).backward()

        label = " | ".join(f"{t.block_m}, {t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages}" for t in (pair, sym))
        try:
            with torch.no_grad():
                fwd = timed(forward, a.repeats)
            both = timed(step, a.repeats)
        except Exception as err:  # a setting that does not fit (shared memory, registers)
            print(f"| {label} | {type(err).__name__}: {str(err)[:60]} | | |")
            continue
        first = first or both
        print(f"| {label} | {fwd:.1f} | {both:.1f} | {both / first:.2f}x |")


if __name__ == "__main__":
    main()
