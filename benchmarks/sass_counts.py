"""Compile the fused loss's Gram kernels for an H100 (sm_90a) on a machine without a GPU and count
their machine instructions: registers, spill stack, exps, float32 ops, all instructions.

    python benchmarks/sass_counts.py [--only 4,12]   (rows by number, 1 = the first)

Static counts of the whole kernel (a persistent kernel's tile body can appear more than once), so
compare versions and tile settings with it, not against a profiler's executed counts. Triton's
runtime wants a GPU to launch, so this swaps in a stand-in driver that reports compute capability
9.0 and stops each launch after compiling; the cubin is read with Triton's bundled cuobjdump.
Needs the Triton wheel's CUDA tools (triton >= 3.3); uses Triton internals, so a future Triton
may break it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FP32_OPS = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP")


class _Stop(Exception):
    """Raised after compiling, instead of launching."""


class _Hopper:
    """A stand-in for Triton's CUDA driver: enough for the JIT to pick sm_90 and compile."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


_compiled: list[Any] = []


def _compile_only(self: JITFunction, key, signature, device, constexprs, options, attrs, warmup):  # type: ignore[no-untyped-def]
    from triton.compiler import ASTSource, compile

    _compiled.append(compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__))
    raise _Stop


def compiled(launch: Callable[[], object]) -> Any:
    """The CompiledKernel of the first kernel `launch` starts."""
    _compiled.clear()
    with contextlib.suppress(_Stop):
        launch()
    return _compiled[-1]


def counts(kernel: Any) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        res = subprocess.run([TOOLS / "cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    ops: collections.Counter[str] = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", line)
        if m:
            ops[m.group(1) + (".EX2" if m.group(2) and m.group(2).startswith(".EX2") else "")] += 1
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {
        "registers": int(reg.group(1)) if reg else -1,
        "stack bytes": int(stack.group(1)) if stack else -1,
        "MUFU.EX2": ops["MUFU.EX2"],
        "fp32 ops": sum(ops[k] for k in FP32_OPS),
        "all": sum(ops.values()),
        "shared KiB": kernel.metadata.shared // 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--only", default="", help="comma-separated row numbers (1 = the first row; default: all)")
    a = p.parse_args()
    driver.set_active(_Hopper())  # type: ignore[arg-type]
    JITFunction._do_compile = _compile_only  # type: ignore[method-assign]
    from csaligner.kernels import triton_strips as tk

    tk._tma_ok = lambda t: True  # type: ignore[assignment]  # no device to ask
    tk._multiprocessors = lambda device: 132  # type: ignore[assignment]
    from csaligner.kernels.fused_kernels import (
        BACKWARD_PAIR_TILES,
        BACKWARD_PAIR_TILES_FLOAT32,
        FORWARD_PAIR_TILES,
        SYMMETRIC_TILES,
        SYMMETRIC_TILES_FLOAT32,
        _finish_grad,
        _pair_grad,
        _pair_lse_kernel,
    )

    s, n, d = a.rows, a.n, a.dim
    x, y = torch.zeros(s, d, dtype=torch.bfloat16), torch.zeros(n, d, dtype=torch.bfloat16)
    vec = torch.zeros
    wide = tk.TritonStrips()
    four_warps = tk.TritonStrips(num_warps=4, num_stages=3, programs_per_sm=2, tma_store=True)
    rows = [
        ("forward X Y^T", "FORWARD_PAIR_TILES", FORWARD_PAIR_TILES),
        ("forward X Y^T", "8 warps, 1 program/SM", wide),
        ("forward t_ii (diagonal tiles, value only)", "FORWARD_PAIR_TILES", FORWARD_PAIR_TILES),
        ("backward X Y^T", "BACKWARD_PAIR_TILES (4 warps, 2 programs/SM, 4 column blocks)", BACKWARD_PAIR_TILES),
        ("backward X Y^T", "8 warps, 1 program/SM (the default before)", BACKWARD_PAIR_TILES_FLOAT32),
        ("backward X Y^T", "4 warps, 2 programs/SM, descriptor stores", four_warps),
        (
            "backward X Y^T",
            "4 warps, 2 programs/SM, epilogue in 2 column blocks",
            replace(four_warps, epilogue_split=2),
        ),
        (
            "backward X Y^T",
            "4 warps, 2 programs/SM, 32-wide K steps, 4 stages, epilogue in 4 column blocks",
            replace(four_warps, block_k=32, num_stages=4, epilogue_split=4),
        ),
        (
            "backward X Y^T",
            "8 warps, 1 program/SM, epilogue in 2 column blocks",
            replace(BACKWARD_PAIR_TILES_FLOAT32, epilogue_split=2),
        ),
        ("backward X Y^T, float32 operands", "BACKWARD_PAIR_TILES_FLOAT32", BACKWARD_PAIR_TILES_FLOAT32),
        ("backward X Y^T, float32 operands", "BACKWARD_PAIR_TILES (4 warps)", BACKWARD_PAIR_TILES),
        ("kernel weights (symmetric)", "SYMMETRIC_TILES (64-wide K, 4 store blocks)", SYMMETRIC_TILES),
        (
            "kernel weights (symmetric)",
            "SYMMETRIC_TILES_FLOAT32 (the default before)",
            SYMMETRIC_TILES_FLOAT32,
        ),
        ("kernel weights (symmetric)", "8 warps, 1 program/SM", wide),
        ("kernel weights (symmetric), float32 operands", "SYMMETRIC_TILES_FLOAT32", SYMMETRIC_TILES_FLOAT32),
        ("kernel weights (symmetric), float32 operands", "SYMMETRIC_TILES (64-wide K)", SYMMETRIC_TILES),
        (
            "kernel weights (symmetric)",
            "4 warps, 2 programs/SM, 64-wide K steps, stores in 2 column blocks",
            replace(four_warps, epilogue_split=2),
        ),
        (
            "kernel weights (symmetric)",
            "SYMMETRIC_TILES, diagonal block mirrored in the epilogue (mirror_diagonal)",
            replace(SYMMETRIC_TILES, mirror_diagonal=True),
        ),
        ("gradient finish (elementwise, (N, D))", "4 warps, 4096 elements", wide),
    ]
    print(f"Triton {triton.__version__}, sm_90a, strip {s} x {n}, D = {d}, bf16 (static counts)")
    print("| kernel | tiles | registers | stack bytes | MUFU.EX2 | fp32 ops | all instructions | shared KiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    only = {int(i) for i in a.only.split(",") if i}
    for number, (kernel, label, t) in enumerate(rows, start=1):
        if only and number not in only:
            continue
        if kernel.startswith("forward"):

            def launch(t: tk.TritonStrips = t, diagonal: bool = "diagonal" in kernel) -> None:
                n_tm, n_tn = t._tiles(x, y)
                args = (x, y, vec(s), vec(n), vec(s), vec(n), vec(n_tn, s), vec(n_tm, n), vec(n_tm * n_tn))
                diag = {"n_tiles": n_tm, "DIAGONAL": True} if diagonal else {}
                t._launch(_pair_lse_kernel, *args, scalars=(20.0, 5.8), ONE_EXP=True, K_BOUNDED=True, **diag)  # type: ignore[arg-type]

        elif kernel.startswith("backward"):

            def launch(t: tk.TritonStrips = t, fp32: bool = "float32" in kernel) -> None:
                vectors = (vec(s), vec(s), vec(n), vec(s), vec(n), vec(s), vec(n))
                positives = (torch.zeros(n, dtype=torch.int32), vec(n))
                scalars = (14.0, 20.0, 5.8, 0)  # the first strip
                grad_scalars = torch.tensor([-29.0, 4.0, 1e-5, 1e-5])  # k_off, k_scale, w_row, w_col
                a, b = (x.float(), y.float()) if fp32 else (x, y)
                _pair_grad(t, a, b, *vectors, *positives, scalars, grad_scalars, True, False, True)

        elif kernel.startswith("gradient"):

            def launch(t: tk.TritonStrips = t) -> None:
                _finish_grad(torch.zeros(n, d), vec(n), y)

        else:

            def launch(t: tk.TritonStrips = t, fp32: bool = "float32" in kernel) -> None:
                a = x.float() if fp32 else x
                t.kernel_grad(a, a, vec(s), vec(s), 4.0, 0.0, 1.0, True, False, True)

        c = counts(compiled(launch))
        print(f"| {kernel} | {label} | " + " | ".join(str(v) for v in c.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
