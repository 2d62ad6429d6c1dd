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


FUSED_CASES = [
    (torch.float32, 0.07, 0.5, False, 64),
    (torch.bfloat16, 0.07, 0.5, False, 64),
    (torch.float32, 0.01, 0.1, True, 64),
    (torch.float32, 0.07, 0.5, False, 20),
]
"""(dtype, temperature, sigma, several captions, images): one exp per logit and max-offset tiles;
20 images make row shares (0, 0), (0, 0), (0, 20): ranks with none."""


def _fused_problem(dtype: torch.dtype, several: bool, n: int = 64) -> tuple[Tensor, Tensor, Tensor | None]:
    """64 images: with 16-row tiles the row shares are (0, 16), (16, 32), (32, 64) and the triangle
    shares (0, 16), (16, 32), (32, 64). Several captions: 16 more texts, second captions."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(n, 16, generator=g), dim=-1)
    t2i = None
    if several:
        y = torch.cat([y, F.normalize(x[:16] + 0.5 * torch.randn(16, 16, generator=g), dim=-1)])
        t2i = torch.cat([torch.arange(n), torch.arange(16)])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels on a GPU, else the interpreter
    return x.to(dev, dtype), y.to(dev, dtype), None if t2i is None else t2i.to(dev)


def _fused_terms(dtype: torch.dtype, t: float, sig: float, several: bool, n: int, group: bool):  # type: ignore[no-untyped-def]
    from csaligner.kernels.fused import fused_infonce_cs
    from tests.kernels.triton_setup import SMALL

    x0, y0, t2i = _fused_problem(dtype, several, n)
    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    temp, sigma = (torch.tensor(v, device=x.device, requires_grad=True) for v in (t, sig))
    kw = {"tiles": SMALL, "chunk_size": 16, "group": dist.group.WORLD if group else None}
    nce, cs = fused_infonce_cs(x, y, temp, sigma, t2i, **kw)
    grads = list(torch.autograd.grad(nce + 0.3 * cs, [x, y, temp, sigma]))
    with torch.no_grad():  # the two-pass symmetric terms (no gradients kept)
        nce_ng, cs_ng = fused_infonce_cs(x0, y0, t, sig, t2i, **kw)
    return [nce.detach(), cs.detach(), nce_ng, cs_ng], grads


def _fused_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # three ranks on one GPU: gloo reduces CUDA tensors too
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = []
        for case in FUSED_CASES:
            values, grads = _fused_terms(*case, group=True)
            for g in grads[:2]:  # world x each rank's share: the sum over ranks is world x the gradient
                g32 = g.float()
                dist.all_reduce(g32)
                g.copy_(g32 / WORLD)
            results.append((values, grads))
        # shard=True with bf16 pairs on the Triton path: the dispatcher takes the fused kernels.
        from csaligner.kernels import fused
        from tests.kernels.triton_setup import SMALL

        real, calls = fused.fused_infonce_cs, []

        def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(kwargs.get("group"))
            return real(*args, **kwargs)

        fused.fused_infonce_cs = spy  # type: ignore[assignment]
        x, y, _ = _fused_problem(torch.bfloat16, False)
        terms = infonce_cs_terms(x, y, temperature=0.07, sigma=0.5, impl="triton", shard=True)
        fused.fused_infonce_cs = real  # type: ignore[assignment]
        # group=None under an initialised process group: this rank's own batch, alone (no collectives:
        # the ranks even pass different sizes).
        xr, yr, _ = _fused_problem(torch.float32, False, 20 + 16 * rank)
        alone = [float(v) for v in real(xr, yr, 0.07, 0.5, tiles=SMALL, chunk_size=16)]
        if rank == 0:
            torch.save((results, len(calls), {k: float(v) for k, v in terms.items()}, alone), out)
    finally:
        dist.destroy_process_group()


def test_sharded_fused_kernels_equal_one_process(tmp_path: Path) -> None:
    """`fused_infonce_cs(group=...)` on 3 ranks: the values of one process and, summed over the ranks,
    its gradients, with and without kept symmetric gradients, learnable temperature and sigma. On a
    GPU the three ranks share it (gloo), so the compiled kernels are checked too."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(
        _fused_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True,
        start_method="spawn" if torch.cuda.is_available() else "fork",  # see test_distributed.py
    )  # fmt: skip
    from csaligner.kernels.fused import fused_infonce_cs
    from tests.kernels.triton_setup import SMALL

    got, n_calls, dispatched, alone = torch.load(tmp_path / "out")
    xr, yr, _ = _fused_problem(torch.float32, False, 20)
    assert alone == [float(v) for v in fused_infonce_cs(xr, yr, 0.07, 0.5, tiles=SMALL, chunk_size=16)]
    x, y, _ = _fused_problem(torch.bfloat16, False)
    assert n_calls == 1
    for k, want in infonce_cs_terms(x.double(), y.double(), temperature=0.07, sigma=0.5, impl="dense").items():
        assert dispatched[k] == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    for case, (values, grads) in zip(FUSED_CASES, got, strict=True):
        want_values, want_grads = _fused_terms(*case, group=False)
        half = case[0] == torch.bfloat16
        for a, b in zip(values, want_values, strict=True):
            assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-6), case  # summation order
        for a, b in zip(grads, want_grads, strict=True):
            tol = 2e-2 if half and a.dim() else 1e-5  # bf16 gradients: each rank's share rounded once more
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()), msg=str(case))


def _empty_share_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, y, t2i = _two_images()
        t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        terms = infonce_cs_terms(x, y, temperature=t, sigma=0.7, text_to_image=t2i, impl="chunked", shard=True)
        grads = list(torch.autograd.grad(terms["infonce"] + terms["cs"], [x, y, t]))
        for g in grads[:2]:
            dist.all_reduce(g)
            g /= WORLD
        torch.save({"terms": {k: v.detach() for k, v in terms.items()}, "grads": grads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _two_images() -> tuple[Tensor, Tensor, Tensor]:
    """2 images, 5 captions: with 3 ranks the row shares are (0, 0), (0, 1), (1, 2)."""
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(2, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return x, y, torch.tensor([0, 1, 1, 0, 1])


def test_a_rank_without_rows_takes_part_in_every_collective(tmp_path: Path) -> None:
    """More ranks than images: the empty rank issues the same all-reduces and all ranks return the
    single-process terms (it failed on index 0 of an empty row share)."""
    x, y, t2i = _two_images()
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    want = {"infonce": info_nce(x, y, t, t2i), "cs": cs_divergence(x, y, 0.7)}
    want_grads = torch.autograd.grad(want["infonce"] + want["cs"], [x, y, t])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(
        _empty_share_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True,
        start_method="spawn" if torch.cuda.is_available() else "fork",  # see test_distributed.py
    )  # fmt: skip
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"out.{rank}")
        for k in ("infonce", "cs"):
            assert float(got["terms"][k]) == pytest.approx(float(want[k]), rel=1e-12, abs=1e-12)
        for a, b in zip(got["grads"], want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
