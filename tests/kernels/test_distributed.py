"""Two gloo processes on CPU: the gathered global-batch loss equals the single-process loss."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from csaligner.kernels import all_gather_with_grad, infonce_cs_terms

WORLD = 2
N_PER_RANK = 6
UNPAIRED = (3, 5)  # uneven unpaired-image pools per rank


def make_problem() -> tuple[nn.Linear, Tensor, Tensor, list[Tensor]]:
    torch.manual_seed(0)
    adapter = nn.Linear(8, 8, dtype=torch.float64)
    images = torch.randn(WORLD * N_PER_RANK, 8, dtype=torch.float64)
    texts = torch.randn(WORLD * N_PER_RANK, 8, dtype=torch.float64)
    unpaired = [torch.randn(k, 8, dtype=torch.float64) for k in UNPAIRED]
    return adapter, images, texts, unpaired


def loss_of(adapter: nn.Linear, img: Tensor, txt: Tensor, extra: Tensor, gather: bool) -> Tensor:
    norm = nn.functional.normalize
    x, y, u = norm(adapter(img), dim=-1), norm(txt, dim=-1), norm(adapter(extra), dim=-1)
    if gather:
        x, y, u = all_gather_with_grad(x), all_gather_with_grad(y), all_gather_with_grad(u)
    x_all = torch.cat([x, u])
    terms = infonce_cs_terms(x, y, x_all, y, temperature=0.1, sigma=0.7, impl="chunked", chunk_size=5)
    return terms["infonce"] + 0.5 * terms["cs"]


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        adapter, images, texts, unpaired = make_problem()
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        loss = loss_of(adapter, images[rows], texts[rows], unpaired[rank], gather=True)
        loss.backward()
        grad = adapter.weight.grad
        assert grad is not None
        dist.all_reduce(grad)
        grad /= WORLD  # what DistributedDataParallel does
        torch.save({"loss": loss.detach(), "grad": grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_single_process(tmp_path: Path) -> None:
    adapter, images, texts, unpaired = make_problem()
    # Single process on the concatenated batch, in rank order.
    single = loss_of(adapter, images, texts, torch.cat(unpaired), gather=False)
    single.backward()
    assert adapter.weight.grad is not None

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children reuse the imported torch (spawn would re-import it, ~10 s on a busy 2-core CPU).
    # Not after CUDA autograd has run in this process (GPU machines): its threads make fork unsafe
    # ("Unable to handle autograd's threading in combination with fork"), so spawn there.
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(
        _worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True, start_method=method
    )
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["loss"], single.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad"], adapter.weight.grad, rtol=1e-10, atol=1e-12)


def test_without_process_group_gather_is_identity() -> None:
    x = torch.randn(4, 3)
    assert all_gather_with_grad(x) is x
