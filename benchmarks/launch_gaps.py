"""Where a fused-loss step leaves the GPU idle: one profiled step, kernel intervals merged (CUDA).

    python benchmarks/launch_gaps.py --n 65536

Prints the step's wall time, the kernels' span and busy time, and the largest gaps between
kernels with the host-side operations (and Python frames) running during each, which is how a
host sync that drains the queue shows up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import infonce_cs_terms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--gaps", type=int, default=6, help="gaps to list")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().bfloat16().requires_grad_()
    y = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1).cuda().bfloat16().requires_grad_()

    def step() -> None:
        x.grad = y.grad = None
        t = infonce_cs_terms(x, y, temperature=0.07, sigma=0.5, impl="triton")
        (t["infonce"] + 0.01 * t["cs"]).backward()

    step()
    torch.cuda.synchronize()
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"step {1e3 * (time.perf_counter() - t0):.1f} ms wall, host returned after {1e3 * (t1 - t0):.1f} ms")
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel")
    busy, gaps, end = 0.0, [], kernels[0][0]
    for start, stop in kernels:
        if start > end:
            gaps.append((start - end, end, start))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - kernels[0][0]
    idle = span - busy
    print(f"{len(kernels)} kernels, span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms")
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function") and "dur" in e]
    for gap, g0, g1 in sorted(gaps, reverse=True)[: a.gaps]:
        print(f"gap {gap / 1e3:.3f} ms; host work overlapping it (innermost first):")
        inside = [e for e in host if e["ts"] < g1 and e["ts"] + e["dur"] > g0 and e["dur"] > 0.3 * gap]
        for e in sorted(inside, key=lambda e: e["dur"])[:8]:
            print(f"    {e['dur'] / 1e3:8.3f} ms  {e['name'][:100]}")


if __name__ == "__main__":
    main()
