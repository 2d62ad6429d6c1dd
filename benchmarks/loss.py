"""Time and measure InfoNCE + 0.01 * D_CS, forward + backward: dense vs chunked vs Triton (vs Inf-CL).

    python benchmarks/loss.py --device cuda                       # H100 defaults: N up to 262144, D=1024
    python benchmarks/loss.py --device cpu --sizes 1024,4096 --dim 256 --dtypes fp32 --impls dense,chunked

Every path of one dtype and size runs in the same invocation, so the ratios to dense compare like
with like. Memory:

* CUDA: torch.cuda.max_memory_allocated() during the measured calls, minus what was allocated
  before them (the inputs), i.e. the loss's own peak working memory.
* CPU: each measurement runs in a fresh subprocess; peak resident set size (ru_maxrss) after the
  calls minus the resident size just before them (imports and inputs). This counts what the
  allocator really touched, including allocator caching, which tracemalloc would not see.

TFLOP/s is *effective*: the dense algorithm's matmul FLOPs (4 N x N x D products forward, each
x3 for forward + backward; InfoNCE alone for Inf-CL) divided by the measured time, whatever the
implementation really executes (chunked recomputes logits but visits half of XX^T and YY^T).
Out-of-memory is caught and reported as OOM (on CPU the child gets an address-space limit).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import infonce_cs_terms

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
CUDA_SIZES = "4096,16384,32768,65536,131072,262144"
CPU_SIZES = "1024,2048,4096,8192,16384"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--sizes", default=None, help=f"comma list of N (cuda: {CUDA_SIZES}; cpu: {CPU_SIZES})")
    p.add_argument("--dim", type=int, default=None, help="feature dim D (cuda: 1024, cpu: 256)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--impls", default="dense,chunked,triton,infcl", help="comma list of dense, chunked, triton, infcl")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (cuda: 5, cpu: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (cuda: 1, cpu: 0)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--cpu-mem-gb", type=float, default=None, help="address-space cap of each CPU child")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.sizes = [int(s) for s in (args.sizes or (CUDA_SIZES if cuda else CPU_SIZES)).split(",")]
    args.dim = args.dim or (1024 if cuda else 256)
    args.dtypes = args.dtypes.split(",")
    args.impls = args.impls.split(",")
    args.repeats = args.repeats or (5 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    return args


def loss_step(impl: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """One forward + backward of InfoNCE + lam * D_CS (Inf-CL: InfoNCE only)."""
    x.grad = y.grad = None
    if impl == "infcl":
        from inf_cl import cal_flash_loss  # type: ignore[import-not-found]

        scale = 1.0 / args.temperature
        head = min(x.shape[1], 256)
        loss = 0.5 * (cal_flash_loss(x, y, scale=scale, head_dim=head).mean()
                      + cal_flash_loss(y, x, scale=scale, head_dim=head).mean())  # fmt: skip
    else:
        terms = infonce_cs_terms(x, y, temperature=args.temperature, sigma=args.sigma, impl=impl)
        loss = terms["infonce"] + args.lam * terms["cs"]
    loss.backward()


def effective_flops(impl: str, n: int, dim: int) -> float:
    products = 1 if impl == "infcl" else 4  # logits, XX^T, YY^T, XY^T
    return 3 * products * 2.0 * n * n * dim


def make_inputs(n: int, dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(n)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    return x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_()


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError | torch.OutOfMemoryError) or "out of memory" in text or "allocate" in text


def measure_cuda(impl: str, n: int, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        x, y = make_inputs(n, args.dim, DTYPES[dtype], "cuda")
        for _ in range(args.warmup):
            loss_step(impl, x, y, args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(args.repeats):
            loss_step(impl, x, y, args)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / args.repeats
        return {"status": "ok", "ms": ms, "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    except Exception as err:  # OOM, or a missing optional package
        return {"status": "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:200]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child_cpu(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the subprocess: returns ms and the peak RSS increase of the measured calls."""
    if spec.get("mem_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (spec["mem_bytes"], spec["mem_bytes"]))
    try:
        x, y = make_inputs(spec["n"], args.dim, DTYPES[spec["dtype"]], "cpu")
        for _ in range(args.warmup):
            loss_step(spec["impl"], x, y, args)
        gc.collect()
        base = max(_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        start = time.perf_counter()
        for _ in range(args.repeats):
            loss_step(spec["impl"], x, y, args)
        ms = (time.perf_counter() - start) * 1e3 / args.repeats
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"status": "ok", "ms": ms, "peak_mib": (peak - base) / 1024}
    except Exception as err:
        return {"status": "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:200]}


def measure_cpu(impl: str, n: int, dtype: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    spec = {"impl": impl, "n": n, "dtype": dtype, "mem_bytes": int(args.cpu_mem_gb * 2**30) if args.cpu_mem_gb else 0}
    cmd = [sys.executable, __file__, *argv, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        killed = proc.returncode in (-9, 137)
        return {"status": "OOM (killed)" if killed else f"error: rc={proc.returncode} {proc.stderr[-200:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} logical CPUs)"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| dtype | N | impl | ms | peak MiB | eff. TFLOP/s | time / dense | memory / dense |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    dense = {(r["dtype"], r["n"]): r for r in rows if r["impl"] == "dense" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['dtype']} | {r['n']} | {r['impl']} | {r['status']} | | | | |")
            continue
        d = dense.get((r["dtype"], r["n"]))
        t_ratio = f"{r['ms'] / d['ms']:.2f}x" if d else "-"
        m_ratio = f"{r['peak_mib'] / d['peak_mib']:.3f}x" if d and d["peak_mib"] > 0 else "-"
        out.append(
            f"| {r['dtype']} | {r['n']} | {r['impl']} | {r['ms']:.1f} | {r['peak_mib']:.1f} | "
            f"{r['tflops']:.3f} | {t_ratio} | {m_ratio} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        torch.manual_seed(0)
        print(json.dumps(child_cpu(json.loads(args.child), args)))
        return
    impls = list(args.impls)
    if "infcl" in impls:
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            print("note: Inf-CL (`inf_cl`) is not installed; skipping it", file=sys.stderr)
            impls.remove("infcl")
        else:
            if args.device != "cuda":
                print("note: Inf-CL needs CUDA; skipping it", file=sys.stderr)
                impls.remove("infcl")
    if "triton" in impls and args.device != "cuda":
        print("note: the Triton path needs CUDA; skipping it on CPU", file=sys.stderr)
        impls.remove("triton")
    rows = []
    for dtype in args.dtypes:
        for n in args.sizes:
            for impl in impls:
                if args.device == "cuda":
                    r = measure_cuda(impl, n, dtype, args)
                else:
                    r = measure_cpu(impl, n, dtype, args, argv)
                r.update(impl=impl, n=n, dtype=dtype, dim=args.dim)
                if r["status"] == "ok":
                    r["tflops"] = effective_flops(impl, n, args.dim) / (r["ms"] * 1e-3) / 1e12
                rows.append(r)
                print(f"# {dtype} N={n} {impl}: {r.get('ms', r['status'])}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        meta = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
            "torch": torch.__version__,
            "argv": argv,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
