"""One entry point for InfoNCE + D_CS: dense reference, chunked O(N)-memory torch, Triton on CUDA.

`infonce_cs_terms` is what `CSAlignerLoss` calls. Every path returns the same named terms and
gradients as the dense reference (tests check this). The chunked and Triton paths share the
autograd Functions of `csaligner.kernels.nce` and `csaligner.kernels.chunked`; only the per-strip
arithmetic (`csaligner.kernels.strips`) differs. When the CS pools are the paired features (no
unpaired extras), Triton uses `csaligner.kernels.fused`, which computes X Y^T once for both
InfoNCE and the cross kernel term.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor

from csaligner._validation import check_chunk_size, check_tensor, checks_finite_once
from csaligner.kernels.chunked import streamed_cs_divergence
from csaligner.kernels.distributed import all_gather_with_grad
from csaligner.kernels.nce import streamed_info_nce
from csaligner.kernels.strips import StripBackend, TorchStrips, strip_rows
from csaligner.losses.contrastive import info_nce
from csaligner.losses.divergence import cs_divergence

Impl = Literal["auto", "dense", "chunked", "triton"]
AUTO_CHUNKED_ABOVE = 4096 * 4096
"""`impl="auto"` off CUDA switches from dense to chunked above this many logits (N * M)."""
TRITON_STRIP_BYTES = 1 << 29
"""Triton backward strips take at most 512 MiB: 4096 rows of bfloat16 weights at N = 65536."""

__all__ = [
    "AUTO_CHUNKED_ABOVE",
    "Impl",
    "StripBackend",
    "Strips",
    "TorchStrips",
    "all_gather_with_grad",
    "infonce_cs_terms",
    "resolve_impl",
    "streamed_cs_divergence",
    "streamed_info_nce",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when `triton` imports (it is the optional extra `csaligner[kernels]`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _half(*ts: Tensor) -> bool:
    """All of ts are bfloat16/float16 (the dtypes the Triton kernels run on tensor cores)."""
    return all(t.dtype in (torch.bfloat16, torch.float16) for t in ts)


def resolve_impl(impl: str, x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor) -> str:
    """Turn "auto" into a concrete path and check that an explicit "triton" can run here."""
    if impl not in ("auto", "dense", "chunked", "triton"):
        raise ValueError(f"impl must be auto, dense, chunked or triton, got {impl!r}")
    fp64 = torch.float64 in (x.dtype, y.dtype, x_all.dtype, y_all.dtype)
    if impl == "auto":
        if x.is_cuda and _half(x, y, x_all, y_all) and triton_available():
            return "triton"  # float32 inputs: exact float32 dots make Triton slower than cuBLAS (BENCHMARKS.md)
        big = max(x.shape[0] * y.shape[0], x_all.shape[0] * y_all.shape[0]) > AUTO_CHUNKED_ABOVE
        return "chunked" if big else "dense"
    if impl == "triton":
        if not triton_available():
            raise ValueError(
                "impl='triton' needs the triton package: pip install 'csaligner[kernels]', or use impl='chunked'"
            )
        if not x.is_cuda and not _interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got device {x.device}; use impl='chunked' "
                "(or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU for tests)"
            )
        if fp64:
            raise ValueError(
                "impl='triton' computes in float32 (bf16/fp16/fp32 inputs); use impl='chunked' for float64"
            )
    return impl


@dataclass(frozen=True)
class Strips:
    """How a chunked or Triton path walks its strips."""

    backend: StripBackend
    operand: torch.dtype | None
    """dtype the strips read (None: the compute dtype, float32 or float64)."""
    center: bool
    """D_CS subtracts the pooled mean first (not for half operands: it would re-round them)."""
    chunk_size: int | None
    """Rows per strip (None: sized to the batch by the torch path)."""


def _strips(path: str, x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, chunk_size: int | None) -> Strips:
    if path != "triton":
        return Strips(TorchStrips(), None, True, chunk_size)
    from csaligner.kernels.triton_strips import TritonStrips, strip_dtype

    tb = TritonStrips()
    if chunk_size is None:
        n_cols = max(y.shape[0], y_all.shape[0], x_all.shape[0])
        budget = TRITON_STRIP_BYTES // strip_dtype(x.dtype).itemsize
        chunk_size = strip_rows(max(x.shape[0], x_all.shape[0], y_all.shape[0]), n_cols, budget, tb.block_m)
    elif chunk_size % tb.block_m:
        raise ValueError(f"chunk_size must be a multiple of the tile size {tb.block_m} for triton, got {chunk_size}")
    return Strips(tb, x.dtype, x.dtype == torch.float32, chunk_size)


def _world_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@checks_finite_once
def infonce_cs_terms(
    x: Tensor,
    y: Tensor,
    x_all: Tensor | None = None,
    y_all: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.07,
    sigma: float | Tensor = 1.0,
    text_to_image: Tensor | None = None,
    with_cs: bool = True,
    impl: Impl = "auto",
    chunk_size: int | None = None,
    shard: bool = False,
    group: Any = None,
) -> dict[str, Tensor]:
    """InfoNCE on the pairs (x, y) and D_CS between the pools x_all and y_all.

    Args:
        x: (N, D) unit-norm image features (the paired part).
        y: (M, D) unit-norm text features; M == N unless text_to_image is given.
        x_all: (N', D) images entering D_CS (x plus unpaired images); defaults to x. Only with with_cs.
        y_all: (M', D) texts entering D_CS; defaults to y. Only with with_cs.
        temperature: InfoNCE temperature > 0, float or 0-dim tensor (a learnable one gets its gradient).
        sigma: Gaussian bandwidth > 0 (already resolved; no "median" here), float or 0-dim tensor.
        text_to_image: optional (M,) image row of each text.
        with_cs: also compute D_CS (False gives InfoNCE alone).
        impl: "dense" (N x M matrices), "chunked" (O((N + M) * chunk) memory, any device),
            "triton" (fused tiles, CUDA), or "auto" (triton for bf16/fp16 on CUDA when it imports;
            otherwise chunked above 4096^2 logits, dense below).
        chunk_size: rows per strip for chunked/triton (None: sized to the batch; for triton a
            multiple of the tile size).
        shard: under an initialised torch.distributed process group, the inputs are the global
            batch, the same on every rank (gathered with `all_gather_with_grad`), and each rank
            computes only its share of the rows of every Gram matrix (`csaligner.kernels.sharded`);
            the ranks all-reduce O(M) statistics and return the same terms. "dense" then runs
            the chunked strips; bf16/fp16 pairs on CUDA (pools = pairs) run the fused kernels so.
            Without a process group (or with one rank) it changes nothing.
        group: the process group for `shard` (default: the world).

    Returns:
        {"infonce": scalar, "cs": scalar (when with_cs)}, float32 (float64 for float64 inputs).
        bf16/fp16 inputs are computed with float32 statistics and get gradients in their dtype.

    Every path ignores an ambient `torch.autocast` (each picks its own precision, as above; the dense
    one through the `csaligner.losses` functions it calls). Under grad mode, with features that
    require gradients, the chunked, Triton and sharded forward passes already compute the D_CS terms'
    gradients (one sweep instead of two) and keep them until backward: evaluate under
    `torch.no_grad()` to skip that work.
    """
    chunk_size = check_chunk_size(chunk_size)
    # A list or array would fail deep in dispatch (AttributeError on .dtype); name the conversion here.
    optional = (("x_all", x_all, "image features"), ("y_all", y_all, "text features"))
    for name, value, what in (("x", x, "image features"), ("y", y, "text features"), *optional):
        if value is not None:
            check_tensor(name, value, what)
    if text_to_image is not None:
        check_tensor("text_to_image", text_to_image, "image row indices")
    if not with_cs and (x_all is not None or y_all is not None):
        raise ValueError(
            "x_all / y_all are the pools of the D_CS term, and with_cs=False computes InfoNCE alone: "
            "drop the pools or pass with_cs=True"
        )
    x_all = x if x_all is None else x_all
    y_all = y if y_all is None else y_all
    path = resolve_impl(impl, x, y, x_all, y_all)
    fused = path == "triton" and with_cs and _half(x, y) and x_all is x and y_all is y
    if shard and _world_size(group) > 1:
        from csaligner.kernels.sharded import sharded_infonce_cs

        strips = _strips("chunked" if path == "dense" else path, x, y, x_all, y_all, chunk_size)
        if fused:  # the fused kernels, each rank on its share of the rows (see fused_infonce_cs)
            import torch.distributed as dist

            from csaligner.kernels.fused import fused_infonce_cs

            nce, cs = fused_infonce_cs(
                x, y, temperature, sigma, text_to_image, chunk_size=cast(int, strips.chunk_size),
                group=dist.group.WORLD if group is None else group,
            )  # fmt: skip
            return {"infonce": nce, "cs": cs}
        return sharded_infonce_cs(
            x, y, x_all, y_all, temperature, sigma, text_to_image, with_cs=with_cs, strips=strips, group=group
        )
    if path == "dense":
        terms = {"infonce": info_nce(x, y, temperature, text_to_image)}
        if with_cs:
            terms["cs"] = cs_divergence(x_all, y_all, sigma)
        return terms
    strips = _strips(path, x, y, x_all, y_all, chunk_size)
    backend, operand, center, chunk_size = strips.backend, strips.operand, strips.center, strips.chunk_size
    if fused:
        # The pools are the pairs: one Gram pass of X Y^T serves both terms.
        from csaligner.kernels.fused import fused_infonce_cs

        # Each kernel takes its own measured tiles (see fused_kernels.py); all have block_m 128, as the strips.
        nce, cs = fused_infonce_cs(x, y, temperature, sigma, text_to_image, chunk_size=cast(int, chunk_size))
        return {"infonce": nce, "cs": cs}
    terms = {
        "infonce": streamed_info_nce(
            x, y, temperature, text_to_image, backend=backend, chunk_size=chunk_size, operand_dtype=operand
        )
    }
    if with_cs:
        terms["cs"] = streamed_cs_divergence(
            x_all, y_all, sigma, backend=backend, chunk_size=chunk_size, operand_dtype=operand, center=center
        )
    return terms
