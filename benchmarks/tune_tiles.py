"""Tile, loading and grid settings of the fused Triton loss, timed against each other in one run (CUDA).

    python benchmarks/tune_tiles.py --n 65536 --dim 1024 --profile

Each row is a set of `TritonStrips` settings (the X Y^T kernels, the symmetric ones, and optionally
a third for the forward X Y^T kernel alone, which otherwise takes the first):
forward and forward + backward of InfoNCE + 0.01 D_CS through `fused_infonce_cs`, mean of
--repeats calls after one warm-up (which also compiles), and the ratio to the first row.
With --profile, one more step per row runs under torch.profiler and the CUDA time of each Triton
kernel (and of all cuBLAS GEMMs together) is printed below the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import TRITON_STRIP_BYTES
from csaligner.kernels.fused import fused_infonce_cs
from csaligner.kernels.strips import strip_rows
from csaligner.kernels.triton_strips import TritonStrips

BASE = TritonStrips(128, 128, 64, 8, 8, 3, tma=False, programs_per_sm=0)  # the tiles of earlier sessions


def parse_tiles(spec: str) -> TritonStrips:
    """'128x128x64:w8:s3:tma:st:p1:g8:e4:nm' -> block m x n x k, warps, stages, tensor descriptors (loads;
    'st': stores too), programs per SM, rows of tiles per L2 group, column blocks of the backward
    X Y^T epilogue, or of the X X^T / Y Y^T kernels' weight stores (`epilogue_split`); 'mi' / 'nm':
    the X X^T / Y Y^T strips with / without their diagonal block mirrored (`mirror_diagonal`)."""
    dims, *opts = spec.split(":")
    bm, bn, bk = (int(v) for v in dims.split("x"))
    t = replace(BASE, block_m=bm, block_n=bn, block_k=bk)
    for o in opts:
        if o == "tma":
            t = replace(t, tma=True)
        elif o == "st":
            t = replace(t, tma_store=True)
        elif o in ("mi", "nm"):
            t = replace(t, mirror_diagonal=o == "mi")
        elif o[0] in "wspge":
            field = {
                "w": "num_warps",
                "s": "num_stages",
                "p": "programs_per_sm",
                "g": "group_m",
                "e": "epilogue_split",
            }[o[0]]
            t = replace(t, **{field: int(o[1:])})
        else:
            raise ValueError(f"unknown tile option {o!r} in {spec!r}")
    return t


SETTINGS: list[tuple[str, ...]] = [  # (X Y^T, X X^T / Y Y^T[, forward X Y^T]); the first is the reference
    ("128x128x64:w8:s3", "128x128x64:w8:s3"),
    ("128x128x64:w8:s3:tma", "128x128x64:w8:s3:tma"),
    ("128x128x64:w8:s4:tma:p1", "128x128x64:w8:s4:tma:p1"),
    ("128x64x64:w4:s4:tma:p2", "128x128x64:w8:s4:tma:p1"),
    ("256x128x64:w8:s3:tma:p1", "128x128x64:w8:s4:tma:p1"),
    ("256x128x64:w16:s3:tma:p1", "128x128x64:w8:s4:tma:p1"),
    ("128x256x64:w8:s3:tma:p1", "128x128x64:w8:s4:tma:p1"),
    ("128x128x64:w8:s4:tma:p2", "128x128x64:w8:s4:tma:p2"),
    ("256x64x64:w8:s4:tma:p1", "128x128x64:w8:s3:tma"),
    ("128x64x64:w4:s3:tma", "128x128x64:w8:s3:tma:p1"),
    ("128x128x64:w8:s4:tma:st:p1", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),  # defaults before
    # The backward X Y^T epilogue on column blocks: with 4 warps and 4 blocks the sm_90a compile has
    # 16 bytes of stack (2,456 unsplit) and 104 KiB of shared memory (192), so two programs fit an SM
    # and one's epilogue can run beside the other's products, as the forward's do
    # (`python benchmarks/sass_counts.py`). Row 12's backward tiles are the default since 4bc16f9
    # (H100, 65k: the backward kernel 23.3 -> 21.3 ms); row 17 holds all of 4bc16f9's defaults.
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w4:s3:tma:st:p2:e2", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w4:s3:tma:p2:e4", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w8:s4:tma:st:p1:e2", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),
    ("128x128x32:w4:s4:tma:st:p2:e4", "128x128x32:w4:s4:tma:st:p2", "128x128x64:w4:s3:tma:p2"),
    # The X X^T / Y Y^T kernels storing their weight tile in column blocks: the staging buffer shrinks
    # from 32 to 8 (e4) or 16 KiB (e2), so 64-wide K steps with 3 stages (or 32-wide ones with 6) fit
    # two programs per SM (with the whole tile staged, 64-wide steps took 26.2 ms against 20.2).
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x64:w4:s3:tma:st:p2:e4", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x64:w4:s3:tma:st:p2:e2", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x32:w4:s6:tma:st:p2:e4", "128x128x64:w4:s3:tma:p2"),
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x32:w4:s4:tma:st:p2:e4", "128x128x64:w4:s3:tma:p2"),
    # Row 17 (the defaults) with the X X^T / Y Y^T strips' diagonal block mirrored
    # (`mirror_diagonal`, on by default from 34937fd until an H100 profile of e39814d showed these
    # kernels at 24.4 ms against 17.4 before it): the second GEMM then skips the block, S x S x D per
    # strip, but the mirroring kernel has 88 bytes of stack against 32 (`benchmarks/sass_counts.py`).
    ("128x128x64:w4:s3:tma:st:p2:e4", "128x128x64:w4:s3:tma:st:p2:e4:mi", "128x128x64:w4:s3:tma:p2"),
]


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def kernel_times(step: Callable[[], None]) -> dict[str, float]:
    """CUDA ms per Triton kernel name, cuBLAS GEMMs summed as 'gemm', the rest as 'other'."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        ms = ev.self_device_time_total / 1e3
        name = ev.key
        key = name if name.startswith("_") else "gemm" if ("nvjet" in name or "gemm" in name) else "other"
        out[key] += ms
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only", default=None, help="comma list of setting numbers (1-based) to run; --spec rows always run"
    )
    p.add_argument(
        "--spec",
        action="append",
        default=[],
        help="extra 'PAIR;SYM[;FORWARD]' setting, e.g. 128x64x64:w4:s4:tma:p2;128x128x64:w8:s4:tma:p1",
    )
    p.add_argument(
        "--chunks", default="", help="comma list of strip rows to time each setting at (default: the library's)"
    )
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().bfloat16().requires_grad_()
    y = F.normalize(x.detach().float().cpu() + 0.5 * torch.randn(a.n, a.dim, generator=g), dim=-1)
    y = y.cuda().bfloat16().requires_grad_()
    print(f"N = {a.n}, D = {a.dim}, bf16, {torch.cuda.get_device_name()}")
    print("| # | setting | strip rows | forward ms | fwd + bwd ms | peak MiB | vs first |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    chosen = {int(i) for i in a.only.split(",")} if a.only else None
    first = None
    profiles = {}
    settings = SETTINGS + [tuple(s.split(";")) for s in a.spec]
    for i, (pair_spec, sym_spec, *fwd_spec) in enumerate(settings, start=1):
        if chosen and i not in chosen and i <= len(SETTINGS):
            continue
        name = " / ".join([pair_spec, sym_spec, *fwd_spec])
        pair, sym = parse_tiles(pair_spec), parse_tiles(sym_spec)
        fwd_tiles = parse_tiles(fwd_spec[0]) if fwd_spec else pair
        default_rows = strip_rows(a.n, a.n, TRITON_STRIP_BYTES // 2, max(pair.block_m, sym.block_m))
        for rows in [int(r) for r in a.chunks.split(",") if r] or [default_rows]:
            first = run_setting(f"{i}", name, x, y, pair, sym, fwd_tiles, rows, a, first, profiles)
    for key, times in profiles.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1]))
        print(f"setting {key} kernel ms: {parts}")


def run_setting(
    i: str,
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    pair: TritonStrips,
    sym: TritonStrips,
    fwd_tiles: TritonStrips,
    rows: int,
    a: argparse.Namespace,
    first: float | None,
    profiles: dict[str, dict[str, float]],
) -> float | None:
    """Time one setting at one strip height; print its table row; return the first row's time."""

    def forward(
        sym: TritonStrips = sym, pair: TritonStrips = pair, fwd: TritonStrips = fwd_tiles, rows: int = rows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_infonce_cs(x, y, 0.07, 0.5, tiles=sym, pair_tiles=pair, forward_tiles=fwd, chunk_size=rows)

    def step() -> None:
        nce, cs = forward()
        (nce + 0.01 * cs).backward()

    try:
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            fwd = timed(forward, a.repeats)
        both = timed(step, a.repeats)
        if a.profile:
            profiles[f"{i}@{rows}"] = kernel_times(step)
    except Exception as err:  # a setting that does not fit (shared memory, registers)
        print(f"| {i} | {name} | {rows} | {type(err).__name__}: {str(err)[:80]} | | | | |")
        return first
    first = first or both
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"| {i} | {name} | {rows} | {fwd:.1f} | {both:.1f} | {peak:.0f} | {both / first:.2f}x |", flush=True)
    return first


if __name__ == "__main__":
    main()
