"""Three gloo processes on CPU: the row-sharded loss equals one process on the whole batch.

Uneven shares (10 images, 14 captions, 7 unpaired images over 3 ranks), several captions per
image, an unpaired pool in D_CS, a learnable temperature and sigma (parameters outside DDP).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner.kernels import Strips, TorchStrips, all_gather_with_grad, infonce_cs_terms
from csaligner.kernels.sharded import sharded_infonce_cs, share, triangle_share
from csaligner.losses import cs_divergence, info_nce

WORLD = 3
T2I = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9])  # sorted: each rank's captions are contiguous
N_IMG, N_TXT, N_UNPAIRED = 10, len(T2I), 7


class Problem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(8, 8, dtype=torch.float64)
        self.text = nn.Linear(8, 8, dtype=torch.float64)
        self.log_t = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
        self.sigma = nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
        self.images = torch.randn(N_IMG, 8, dtype=torch.float64)
        self.texts = torch.randn(N_TXT, 8, dtype=torch.float64)
        self.unpaired = torch.randn(N_UNPAIRED, 8, dtype=torch.float64) + 0.3

    def features(self, rank: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's images, captions and unpaired images (all of them for rank None), projected."""
        img, txt, unp = self.images, self.texts, self.unpaired
        if rank is not None:
            lo, hi = share(N_IMG, rank, WORLD)
            u0, u1 = share(N_UNPAIRED, rank, WORLD)
            img, txt, unp = img[lo:hi], txt[(lo <= T2I) & (hi > T2I)], unp[u0:u1]
        x, y, u = (F.normalize(f, dim=-1) for f in (self.image(img), self.text(txt), self.image(unp)))
        return x, y, u

    def loss(self, x: Tensor, y: Tensor, u: Tensor, impl: str, shard: bool) -> Tensor:
        terms = infonce_cs_terms(
            x, y, torch.cat([x, u]), y, temperature=self.log_t.exp(), sigma=self.sigma, text_to_image=T2I,
            impl=impl, chunk_size=2, shard=shard,  # type: ignore[arg-type]
        )  # fmt: skip
        return terms["infonce"] + 0.5 * terms["cs"]


class RowCounting(TorchStrips):
    """Counts the logit rows each kind of strip call covers."""

    def __init__(self) -> None:
        self.rows = {"logits": 0, "kernel": 0}

    def logits_lse(self, a, b, scale):  # type: ignore[no-untyped-def]
        self.rows["logits"] += a.shape[0]
        return super().logits_lse(a, b, scale)

    def logits_lse_split(self, a, b, scale, pos_row):  # type: ignore[no-untyped-def]
        self.rows["logits"] += a.shape[0]
        return super().logits_lse_split(a, b, scale, pos_row)

    def kernel_lse(self, a, b, u, v, inv_s2, symmetric):  # type: ignore[no-untyped-def]
        self.rows["kernel"] += a.shape[0]
        return super().kernel_lse(a, b, u, v, inv_s2, symmetric)


def low_loss_pairs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(60, 32, generator=g), dim=-1)
    return x, F.normalize(x + 0.02 * torch.randn(60, 32, generator=g), dim=-1)


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        p = Problem()
        x, y, u = (all_gather_with_grad(f) for f in p.features(rank))
        loss = p.loss(x, y, u, "chunked", shard=True)
        loss.backward()
        grads = {name: q.grad.clone() for name, q in p.named_parameters() if q.grad is not None}
        for name in ("image.weight", "image.bias", "text.weight", "text.bias"):
            dist.all_reduce(grads[name])
            grads[name] /= WORLD  # what DistributedDataParallel does; log_t and sigma stay as they are
        # Frozen features, learnable temperature and sigma: the kernel terms take two passes.
        frozen = p.loss(*(t.detach() for t in (x, y, u)), "chunked", shard=True)
        scalar_grads = torch.autograd.grad(frozen, [p.log_t, p.sigma])
        spy = RowCounting()
        with torch.no_grad():
            sharded_infonce_cs(
                x, y, torch.cat([x, u]), y, 0.1, 0.6, T2I, with_cs=True, strips=Strips(spy, None, True, 2)
            )
        # The one-pass buffers are released by backward; a retained graph's second backward gives the same bits.
        xd, yd = x.detach().requires_grad_(), y.detach().requires_grad_()
        terms = infonce_cs_terms(xd, yd, temperature=0.1, sigma=0.6, text_to_image=T2I, impl="chunked", shard=True)
        first = torch.autograd.grad(terms["infonce"] + terms["cs"], [xd, yd], retain_graph=True)
        released = terms["cs"].grad_fn.kept is None  # type: ignore[union-attr]
        second = torch.autograd.grad(terms["infonce"] + terms["cs"], [xd, yd])
        same_bits = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        nce_only = infonce_cs_terms(x, y, temperature=0.1, text_to_image=T2I, with_cs=False, shard=True)
        # sigma = 0.1: the cross term's logits span 200 nats, no offset ahead: two passes, recompute.
        narrow = infonce_cs_terms(xd, yd, sigma=0.1, text_to_image=T2I, impl="chunked", shard=True)["cs"]
        narrow_grads = torch.autograd.grad(narrow, [xd, yd])
        for g in narrow_grads:
            dist.all_reduce(g)  # world x each rank's share, summed: world x the gradient
        xl, yl = low_loss_pairs()  # float32, a loss near 0: the value from consistent positives across ranks
        low = infonce_cs_terms(xl, yl, temperature=0.05, with_cs=False, impl="chunked", chunk_size=16, shard=True)
        torch.save(
            {"loss": loss.detach(), "grads": grads, "rows": spy.rows, "scalars": scalar_grads, "released": released,
             "same_bits": same_bits, "nce_only": nce_only["infonce"].detach(), "nce_only_keys": sorted(nce_only),
             "narrow": narrow.detach(), "narrow_grads": [g / WORLD for g in narrow_grads],
             "low": low["infonce"].detach()},
            f"{out}.{rank}",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_sharded_loss_and_gradients_equal_single_process(tmp_path: Path) -> None:
    single = Problem()
    feats = single.features(None)
    want = single.loss(*feats, "dense", shard=False)
    want_scalars = torch.autograd.grad(
        single.loss(*(t.detach() for t in feats), "dense", False), [single.log_t, single.sigma]
    )
    want.backward()
    xl, yl = low_loss_pairs()
    want_low = float(info_nce(xl.double(), yl.double(), 0.05))
    want_nce_only = infonce_cs_terms(feats[0], feats[1], temperature=0.1, text_to_image=T2I, with_cs=False)["infonce"]
    xd, yd = feats[0].detach().requires_grad_(), feats[1].detach().requires_grad_()
    want_narrow = cs_divergence(xd, yd, 0.1)
    want_narrow_grads = torch.autograd.grad(want_narrow, [xd, yd])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    method = "spawn" if torch.cuda.is_available() else "fork"  # see test_distributed.py
    mp.start_processes(
        _worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True, start_method=method
    )
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-12, atol=1e-12)
        for name, q in single.named_parameters():
            torch.testing.assert_close(got["grads"][name], q.grad, rtol=1e-9, atol=1e-12, msg=name)
        assert got["released"] and got["same_bits"]
        assert got["nce_only_keys"] == ["infonce"]
        assert abs(float(got["low"]) - want_low) <= 1e-7 * max(1.0, want_low)  # was ~1e-6 off at 1e-5
        torch.testing.assert_close(got["narrow"], want_narrow.detach(), rtol=1e-10, atol=1e-10)
        for g, w in zip(got["narrow_grads"], want_narrow_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got["nce_only"], want_nce_only, rtol=1e-12, atol=1e-12)
        for g, w in zip(got["scalars"], want_scalars, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        # Each rank's strips cover its share of the rows, against all columns.
        # X X^T and Y Y^T: balanced shares of the upper triangle; X Y^T: even shares of the rows.
        img0, img1 = share(N_IMG, rank, WORLD)
        pool0, pool1 = share(N_IMG + N_UNPAIRED, rank, WORLD)
        tri0, tri1 = triangle_share(N_IMG + N_UNPAIRED, rank, WORLD)
        ttri0, ttri1 = triangle_share(N_TXT, rank, WORLD)
        assert got["rows"] == {"logits": img1 - img0, "kernel": (tri1 - tri0) + (ttri1 - ttri0) + (pool1 - pool0)}


def test_triangle_shares_balance_the_upper_triangle_and_respect_alignment() -> None:
    n, world = 1000, 4
    edges = [triangle_share(n, r, world) for r in range(world)]
    assert edges[0][0] == 0 and edges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    areas = [sum(n - i for i in range(lo, hi)) for lo, hi in edges]
    assert max(areas) / min(areas) < 1.01
    aligned = [triangle_share(n, r, world, align=64) for r in range(world)]
    assert all(lo % 64 == 0 for lo, _ in aligned) and aligned[-1][1] == n
    # Fewer tiles than ranks: the last rank takes all the rows, the others none.
    assert [triangle_share(5, r, 3, align=64) for r in range(3)] == [(0, 0), (0, 0), (0, 5)]


def test_shard_without_a_process_group_is_the_plain_loss() -> None:
    p = Problem()
    x, y, u = p.features(None)
    assert float(p.loss(x, y, u, "chunked", shard=True)) == pytest.approx(float(p.loss(x, y, u, "dense", False)))


def _triton_worker(rank: int, store: str, out: str) -> None:
    from tests.kernels.triton_setup import SMALL

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, y, u = _float32_problem()
        terms = sharded_infonce_cs(
            x, y, torch.cat([x, u]), y, 0.05, 0.5, None, with_cs=True, strips=Strips(SMALL, torch.float32, True, 16)
        )
        gx, gy = torch.autograd.grad(terms["infonce"] + 0.5 * terms["cs"], [x, y])
        for g in (gx, gy):
            dist.all_reduce(g)  # each rank returns world x its share: the sum over ranks is world x the gradient
        if rank == 0:
            torch.save({"terms": {k: v.detach() for k, v in terms.items()}, "grads": (gx / WORLD, gy / WORLD)}, out)
    finally:
        dist.destroy_process_group()


def _float32_problem() -> tuple[Tensor, Tensor, Tensor]:
    """40 pairs and 20 unpaired images: with 16-row tiles the triangle shares of the 60-image pool
    are (0, 16), (16, 32), (32, 60), so every rank walks symmetric strips."""
    g = torch.Generator().manual_seed(1)
    x, y, u = (F.normalize(torch.randn(n, 16, generator=g), dim=-1) for n in (40, 40, 20))
    return x.requires_grad_(), y.requires_grad_(), u


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter run (CPU); CUDA runs test the kernels")
def test_sharded_triton_strips_match_dense(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1")
    x, y, u = _float32_problem()
    assert [triangle_share(60, r, WORLD, align=16) for r in range(WORLD)] == [(0, 16), (16, 32), (32, 60)]
    want = infonce_cs_terms(x, y, torch.cat([x, u]), y, temperature=0.05, sigma=0.5, impl="dense")
    want_grads = torch.autograd.grad(want["infonce"] + 0.5 * want["cs"], [x, y])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(
        _triton_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True,
        start_method="fork",
    )  # fmt: skip
    got = torch.load(tmp_path / "out")
    for k in ("infonce", "cs"):
        assert float(got["terms"][k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-6)
    for g, w in zip(got["grads"], want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
