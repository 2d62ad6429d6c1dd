"""Global-batch losses under torch.distributed: all-gather features with gradient.

Each rank gathers every rank's features (in rank order) and computes InfoNCE + D_CS on the
global batch, so the loss is the single-process loss on the concatenated batch:

    x_glob = all_gather_with_grad(x_local)   # (sum of N_r, D)
    terms = infonce_cs_terms(x_glob, y_glob, ...)

Backward: every rank holds the same loss L and the same dL/dx_glob; `all_gather_with_grad` sums
those gradients over ranks (all-reduce) and returns this rank's slice, i.e. world_size * dL/dx_local.
DistributedDataParallel then averages parameter gradients over ranks, which cancels the factor:
the update equals the single-process one (open_clip's gather_with_grad does the same).

The gather costs O(global N * D) per rank. With `infonce_cs_terms(..., shard=True)` (what the
training step passes under torchrun) each rank then computes only its share of the rows of every
Gram matrix and the ranks all-reduce O(N) statistics (`csaligner.kernels.sharded`); without it,
every rank does the whole O(N^2 D) loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        world = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group=group)
        counts = [int(s) for s in sizes]
        # Pad to the largest rank so uneven batches (e.g. unpaired pools) gather too.
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        # all_reduce rather than reduce_scatter: gloo has no reduce_scatter, and uneven sizes are simple.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate x (N_r, ...) from every rank in rank order; the gradient flows back to each rank.

    Without an initialised process group (or with one rank) this returns x unchanged.

    Args:
        x: (N_r, D) this rank's features; N_r may differ between ranks.
        group: process group (default: the world).

    Returns:
        (sum_r N_r, D) tensor. Its backward returns the sum over ranks of the gathered
        gradient's slice for this rank (see the module docstring for why that is right with DDP).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    # gloo has no bf16/fp16 all_gather; the loss works in float32 anyway.
    if x.dtype in (torch.bfloat16, torch.float16) and dist.get_backend(group) == "gloo":
        x = x.float()
    out: Tensor = _AllGather.apply(x, group)
    return out
