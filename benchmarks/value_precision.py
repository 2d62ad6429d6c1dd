"""How far each path's InfoNCE *value* lies from float64, from a loss near 0 to a large one.

    python benchmarks/value_precision.py            # CPU: the fused Triton path through Triton's interpreter
    python benchmarks/value_precision.py --device cuda

Pairs y = normalize(x + noise * g) of unit vectors: small noise and a low temperature give a loss
near 0, where a value formed as (log-sum-exp) - (positive logit), two ~scale-sized float32 numbers,
loses everything below ~1e-7 * scale. Prints the error of dense float32 (`losses.info_nce`), the
chunked path (`impl="chunked"`) and the fused Triton path (bf16 and float32 inputs), each against
float64 dense on the same (rounded) inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--device" not in sys.argv or "cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import streamed_info_nce
from csaligner.kernels.fused import fused_infonce_cs
from csaligner.kernels.triton_strips import TritonStrips
from csaligner.losses import info_nce

CASES = [(0.05, 0.02), (0.03, 0.05), (0.01, 0.02), (0.01, 0.3), (0.03, 0.6), (0.01, 1.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=300, help="pairs (not a multiple of the tiles: partial tiles)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    small = a.device == "cpu"  # the interpreter: small tiles, several strips
    tiles = TritonStrips(block_m=32, block_n=32, block_k=32, num_warps=1, num_stages=1) if small else None
    chunk = 64 if small else 4096
    g = torch.Generator().manual_seed(a.seed)
    print(f"N = {a.n}, D = {a.dim}, seed {a.seed}, device {a.device}; value - float64 dense value")
    print("| T | noise | loss (float64) | dense fp32 | chunked fp32 | fused fp32 | fused bf16 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for temperature, noise in CASES:
        x0 = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1)
        y0 = F.normalize(x0 + noise * torch.randn(a.n, a.dim, generator=g), dim=-1)
        x, y = x0.to(a.device), y0.to(a.device)
        want = float(info_nce(x.double(), y.double(), temperature))
        row = [float(info_nce(x, y, temperature)) - want, float(streamed_info_nce(x, y, temperature)) - want]
        f32, _ = fused_infonce_cs(x, y, temperature, 0.5, tiles=tiles, chunk_size=chunk)
        row.append(float(f32) - want)
        xb, yb = x.bfloat16(), y.bfloat16()  # its own reference: the same rounded inputs in float64
        fb, _ = fused_infonce_cs(xb, yb, temperature, 0.5, tiles=tiles, chunk_size=chunk)
        row.append(float(fb) - float(info_nce(xb.double(), yb.double(), temperature)))
        print(f"| {temperature} | {noise} | {want:.3e} | " + " | ".join(f"{e:+.1e}" for e in row) + " |", flush=True)


if __name__ == "__main__":
    main()
