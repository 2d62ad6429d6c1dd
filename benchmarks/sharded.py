"""Row-sharded InfoNCE + 0.01 * D_CS under torch.distributed vs every rank computing the whole loss.

    python benchmarks/sharded.py --world 2 --sizes 2048,4096,8192 --dim 128

Starts `--world` gloo processes on this machine's CPU (one intra-op thread each). Every rank holds
the same global batch (N image and N text features, the CS pools equal to the pairs) and times
forward + backward of the loss computed two ways in the same run:

* full: every rank computes the whole loss (`infonce_cs_terms(..., impl="chunked")`), which is
  what training did before the loss could shard;
* sharded: `shard=True`, each rank takes 1/world of the rows of every Gram matrix and the ranks
  all-reduce O(N) statistics.

Reported per N: the slowest rank's time of each (the step waits for it), their ratio (ideally
1/world), and how far the two losses and feature gradients differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from csaligner.kernels import infonce_cs_terms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--world", type=int, default=2, help="processes (gloo, one thread each)")
    p.add_argument("--sizes", default="2048,4096,8192", help="comma list of global batch sizes N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, after one warm-up")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _step(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, shard: bool) -> tuple[float, torch.Tensor]:
    xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
    terms = infonce_cs_terms(xs, ys, temperature=args.temperature, sigma=args.sigma, impl="chunked", shard=shard)
    loss = terms["infonce"] + 0.01 * terms["cs"]
    loss.backward()
    assert xs.grad is not None and ys.grad is not None
    return float(loss.detach()), torch.cat([xs.grad, ys.grad])


def _time(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, shard: bool) -> tuple[float, float, torch.Tensor]:
    _step(x, y, args, shard)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        loss, grad = _step(x, y, args, shard)
    dist.barrier()
    return (time.perf_counter() - t0) / args.repeats * 1000.0, loss, grad


def _worker(rank: int, args: argparse.Namespace, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    try:
        rows: list[dict[str, Any]] = []
        for n in (int(s) for s in args.sizes.split(",")):
            g = torch.Generator().manual_seed(n)  # the same global batch on every rank
            x = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1)
            y = F.normalize(torch.randn(n, args.dim, generator=g) + 0.2, dim=-1)
            full_ms, full_loss, full_grad = _time(x, y, args, shard=False)
            shard_ms, shard_loss, shard_grad = _time(x, y, args, shard=True)
            # shard=True returns world x this rank's share (all_gather_with_grad's convention): sum and compare.
            dist.all_reduce(shard_grad)
            err = float((shard_grad / args.world - full_grad).abs().max() / full_grad.abs().max())
            times = torch.tensor([full_ms, shard_ms], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            row = {"n": n, "full_ms": float(times[0]), "sharded_ms": float(times[1])}
            rows.append({**row, "loss_diff": abs(full_loss - shard_loss), "grad_rel_err": err})
            if rank == 0:
                r = rows[-1]
                print(f"# N={n}: full {r['full_ms']:.1f} ms, sharded {r['sharded_ms']:.1f} ms", flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.start_processes(_worker, args=(args, str(Path(tmp) / "store"), out), nprocs=args.world, start_method="spawn")
        rows: list[dict[str, Any]] = json.loads(Path(out).read_text())
    print(f"\nworld = {args.world} gloo processes x 1 thread, D = {args.dim}, fp32, fwd + bwd, mean of {args.repeats}")
    print("| N | every rank, whole loss | sharded | sharded / whole | loss diff | grad rel. err |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['full_ms']:.1f} ms | {r['sharded_ms']:.1f} ms | {r['sharded_ms'] / r['full_ms']:.2f}x "
            f"| {r['loss_diff']:.1e} | {r['grad_rel_err']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"world": args.world, "dim": args.dim, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
