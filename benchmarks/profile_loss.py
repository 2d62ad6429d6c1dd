"""Where the time of one fused-loss step goes on CUDA: torch.profiler's kernel table for one impl.

python benchmarks/profile_loss.py --n 32768 --dim 1024 --dtype bf16 --impl triton
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import infonce_cs_terms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--impl", default="triton")
    p.add_argument("--rows", type=int, default=15, help="kernels to list")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().to(dtype).requires_grad_()
    y = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().to(dtype).requires_grad_()

    def step() -> None:
        t = infonce_cs_terms(x, y, temperature=0.07, sigma=0.5, impl=a.impl)
        (t["infonce"] + 0.01 * t["cs"]).backward()

    step()  # compile / warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
