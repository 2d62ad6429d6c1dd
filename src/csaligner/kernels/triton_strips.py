"""`TritonStrips`: the `StripBackend` on the Triton tile kernels of `csaligner.kernels.triton_kernels`.

The host side: tile configuration (a frozen dataclass; the measured defaults of the fused loss are
in `csaligner.kernels.fused_kernels`), grid and operand choice (tensor descriptors where the device
has the bulk copy engine, persistent programs per multiprocessor), and the small partial buffers
each kernel writes, merged here with torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor  # triton >= 3.3, as is tl.range(flatten=)

from csaligner.kernels.strips import KernelStrip
from csaligner.kernels.triton_kernels import (
    INTERPRETING,
    LOG2E,
    _kernel_grad_kernel,
    _kernel_lse_kernel,
    _logits_grad_kernel,
    _logits_lse_kernel,
    _sum_rows_kernel,
)


@dataclass(frozen=True)
class TritonStrips:
    """`StripBackend` on Triton tiles. Tile sizes are compile-time constants (small ones for tests).

    Operands may be float32 (exact "ieee" dots), bfloat16 or float16 (tensor cores, fp32 accumulate).
    Weight strips are float32 for float32 operands and bfloat16 otherwise (`strip_dtype`). InfoNCE
    strips fold the positives in (no cancellation); kernel strips come with the row and column sums
    of the rounded weights, so sum_j W_ij (b_j - a_i) = W b - rowsum(W) a cancels exactly.
    """

    block_m: int = 128
    """Tile rows; also the granularity of strips. The symmetric terms need block_n == block_m."""
    block_n: int = 128
    block_k: int = 64
    """Feature-dimension step of the dot-product loop."""
    group_m: int = 8
    num_warps: int = 8
    num_stages: int | None = None
    """Software-pipeline depth of the K loop; None: 4 for half operands, 3 for float32 (whose
    128 x 128 x 64 tiles take 64 KiB of shared memory per stage)."""
    tma: bool = True
    """Load operand tiles through tensor descriptors (the bulk copy engine) where the device has one
    (compute capability >= 9) and the operands are 16-byte aligned; pointer loads otherwise.
    Half operands only on CUDA: float32 always uses pointer loads there (see `_grid`)."""
    tma_store: bool = False
    """Write weight strips through tensor descriptors (each tile staged in shared memory, then one
    bulk store per tile, or per column block with `epilogue_split`) where the operands use them;
    per-thread stores otherwise."""
    programs_per_sm: int = 1
    """0: one program per tile. k > 0: a persistent grid of k programs per multiprocessor, each
    looping over tiles, so that one tile's loads are issued while the previous tile's epilogue runs.
    Measured on an H100 at N = 65,536 (docs/BENCHMARKS.md): 1 with tensor descriptors and 4 stages
    took the fused loss from 164.6 ms (pointers, a program per tile) to 144.3 ms. Half operands
    only on CUDA: float32 always runs a program per tile there."""
    epilogue_split: int = 1
    """The fused backward X Y^T kernel (`fused_kernels._pair_grad_body`) runs its epilogue on this
    many column blocks of block_n / epilogue_split, one after the other (1, 2 or 4), which lowers the
    registers the epilogue's float32 temporaries need at once. The kernel-weight kernels
    (`kernel_grad`) store their weight tile in that many column blocks when stores go through tensor
    descriptors, so the staging buffer takes 1 / epilogue_split of a tile's shared memory. The other
    kernels ignore it."""

    mirror_diagonal: bool = False
    """Symmetric weight strips (`kernel_grad`) hold their (S, S) diagonal block whole: each tile
    above the diagonal also writes its transpose below it, and diagonal tiles are stored unhalved.
    The caller then applies W^T only to the columns past the block (`StripBackend.mirror_diagonal`),
    which saves S x S x D of the second GEMM per strip (S / N of a symmetric term's GEMMs).

    Off by default since an H100 profile at N = 65,536 (bf16, D = 1024; docs/BENCHMARKS.md, "Mirroring
    profiled"): with it these kernels took 24.4 ms, against 17.4 ms in the last profile without it,
    and the GEMMs 44.6 ms against 46.0. Its transposed store keeps the weight tile live to the end
    of the epilogue (sm_90a: 88 bytes of stack against 32), which costs every tile, not only the few
    it mirrors."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        if self.programs_per_sm < 0:
            raise ValueError(f"programs_per_sm must be >= 0 (0: a program per tile), got {self.programs_per_sm}")
        if self.epilogue_split not in (1, 2, 4) or self.block_n // self.epilogue_split < 16:
            raise ValueError(
                f"epilogue_split must be 1, 2 or 4 with block_n / epilogue_split >= 16, got {self.epilogue_split} "
                f"(block_n={self.block_n})"
            )
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1 or None (by dtype), got {self.num_stages}")

    @property
    def symmetric_rows(self) -> int:
        return self.block_m  # diagonal tiles are weighted 1/2 as a whole

    def _check_square(self, symmetric: bool) -> None:
        if symmetric and self.block_m != self.block_n:
            raise ValueError(
                f"the symmetric XX^T / YY^T terms need square tiles, got block_m={self.block_m}, block_n={self.block_n}"
            )

    def _grid(self, n_tiles: int, a: Tensor, b: Tensor) -> tuple[int, bool, bool]:
        """(programs, tensor descriptors?, persistent?) of one launch over n_tiles tiles.

        Float32 operands on CUDA (exact "ieee" dots on CUDA cores) keep pointer loads and a program
        per tile: with descriptors and the persistent loop they ran 15x slower on an H100
        (docs/BENCHMARKS.md). The interpreter runs every variant for every dtype (the tests)."""
        fast = a.dtype in HALF_DTYPES or INTERPRETING
        tma = fast and self.tma and _tma_ok(a) and _tma_ok(b)
        per_sm = self.programs_per_sm if fast else 0
        programs = min(n_tiles, per_sm * _multiprocessors(a.device)) if per_sm else n_tiles
        return programs, tma, per_sm > 0

    def _launch(
        self,
        kernel: triton.JITFunction,
        a: Tensor,
        b: Tensor,
        *args: object,
        n_tiles: int | None = None,
        **meta: object,
    ) -> None:
        """Launch over the (a rows) x (b rows) tiles, or over `n_tiles` of them (a kernel that maps
        its own few tiles)."""
        n_tm, n_tn = self._tiles(a, b)
        half = a.dtype in HALF_DTYPES
        programs, tma, persistent = self._grid(n_tm * n_tn if n_tiles is None else n_tiles, a, b)
        if tma:  # descriptors of the (BM, BK) / (BN, BK) blocks the K loop reads
            a_op, b_op = _descriptor(a, self.block_m, self.block_k), _descriptor(b, self.block_n, self.block_k)
        else:
            a_op, b_op = a, b
        kernel[(programs,)](
            a_op,
            b_op,
            *args,
            a.shape[0],
            b.shape[0],
            a.shape[1],
            *meta.pop("scalars", ()),
            n_tm,
            n_tn,  # type: ignore[misc]
            BM=self.block_m,
            BN=self.block_n,
            BK=self.block_k,
            GROUP_M=self.group_m,
            PREC="tf32" if half else "ieee",
            UPCAST=INTERPRETING and half,
            TMA=tma,
            FLATTEN=persistent,
            EVEN=a.shape[0] % self.block_m == 0 and b.shape[0] % self.block_n == 0,  # no masks anywhere
            num_warps=self.num_warps,
            num_stages=self.num_stages if self.num_stages is not None else (4 if half else 3),
            **meta,
        )

    def _out_operand(self, out: Tensor, a: Tensor, b: Tensor, block_n: int | None = None) -> tuple[object, bool]:
        """The strip `out` as a kernel argument: a tensor descriptor of (BM, BN) tiles when stores go
        through the copy engine (`tma_store`, operands on descriptors), else the tensor itself.
        block_n: the width of the blocks stored (default: the tile's)."""
        if self.tma_store and self._grid(1, a, b)[1] and _tma_ok(out):
            return _descriptor(out, self.block_m, block_n or self.block_n), True
        return out, False

    def _tiles(self, a: Tensor, b: Tensor) -> tuple[int, int]:
        return triton.cdiv(a.shape[0], self.block_m), triton.cdiv(b.shape[0], self.block_n)

    def logits_lse(self, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        n_tm, n_tn = self._tiles(a, b)
        row_part = torch.empty((n_tn, a.shape[0]), dtype=torch.float32, device=a.device)
        col_part = torch.empty((n_tm, b.shape[0]), dtype=torch.float32, device=a.device)
        self._launch(_logits_lse_kernel, a, b, row_part, col_part, scalars=(scale * LOG2E,))
        return torch.logsumexp(row_part, 0), torch.logsumexp(col_part, 0)

    gathers_positives = False  # see logits_lse_split

    def logits_lse_split(
        self, a: Tensor, b: Tensor, scale: float, pos_row: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The tile kernels keep log-sum-exps only: (lse, 0, lse, 0) and no positives (the caller
        takes a dot per pair; the fused kernels gather theirs, see `fused._info_nce_value`)."""
        row, col = self.logits_lse(a, b, scale)
        return row, torch.zeros_like(row), col, torch.zeros_like(col), None

    def logits_grad(
        self,
        a: Tensor,
        b: Tensor,
        scale: float,
        row_lse: Tensor,
        col_lse: Tensor,
        w_row: float,
        w_col: float,
        pos_row: Tensor,
        pos_w: Tensor,
        want_dot: bool,
    ) -> tuple[Tensor, Tensor | None]:
        n_tm, n_tn = self._tiles(a, b)
        g = torch.empty((a.shape[0], b.shape[0]), dtype=strip_dtype(a.dtype), device=a.device)
        dot = torch.empty(n_tm * n_tn, dtype=torch.float32, device=a.device)
        self._launch(
            _logits_grad_kernel,
            a,
            b,
            row_lse.float() * LOG2E,
            col_lse.float() * LOG2E,
            pos_row.to(torch.int32).contiguous(),
            pos_w.float().contiguous(),
            g,
            dot,
            scalars=(scale * LOG2E, w_row, w_col),
        )
        return g, dot.sum() if want_dot else None

    def kernel_lse(
        self, a: Tensor, b: Tensor, u: Tensor, v: Tensor, inv_s2: float, symmetric: bool, bounded: bool = False
    ) -> Tensor:
        """As `StripBackend.kernel_lse`; `bounded` promises every logit is >= -80 (no max offset needed)."""
        self._check_square(symmetric)
        n_tm, n_tn = self._tiles(a, b)
        part = torch.empty(n_tm * n_tn, dtype=torch.float32, device=a.device)
        self._launch(
            _kernel_lse_kernel,
            a,
            b,
            u.float() * LOG2E,
            v.float() * LOG2E,
            part,
            scalars=(inv_s2 * LOG2E,),
            SYMMETRIC=symmetric,
            BOUNDED=bounded,
        )
        return part.sum().log() if bounded else torch.logsumexp(part, 0)

    def kernel_grad(
        self,
        a: Tensor,
        b: Tensor,
        u: Tensor,
        v: Tensor,
        inv_s2: float,
        log_z: float,
        g: float,
        symmetric: bool,
        want_dot: bool,
        want_total: bool = False,
    ) -> KernelStrip:
        self._check_square(symmetric)
        if symmetric and a.shape[0] % self.block_m and a.shape[0] != b.shape[0]:
            # Diagonal tiles are weighted (and, mirrored, stored) whole: a strip ending inside one would
            # weight the columns past its last row as diagonal ones.
            raise ValueError(
                f"a symmetric strip's rows must be a multiple of block_m={self.block_m} unless it reaches b's last "
                f"row, got {a.shape[0]} rows against {b.shape[0]}; pass chunk_size as a multiple of {self.block_m}"
            )
        n_tm, n_tn = self._tiles(a, b)
        w = torch.empty((a.shape[0], b.shape[0]), dtype=strip_dtype(a.dtype), device=a.device)
        row_part = torch.empty((n_tn, a.shape[0]), dtype=torch.float32, device=a.device)
        col_part = torch.empty((n_tm, b.shape[0]), dtype=torch.float32, device=a.device)
        dot = torch.empty(n_tm * n_tn, dtype=torch.float32, device=a.device)
        total = torch.empty(n_tm * n_tn, dtype=torch.float32, device=a.device)
        w_arg, store_tma = self._out_operand(w, a, b, self.block_n // self.epilogue_split)
        self._launch(
            _kernel_grad_kernel,
            a,
            b,
            u.float() * LOG2E,
            v.float() * LOG2E,
            w_arg,
            row_part,
            col_part,
            dot,
            total,
            scalars=(inv_s2 * LOG2E, -log_z * LOG2E, g),
            SYMMETRIC=symmetric,
            WANT_DOT=want_dot,
            WANT_TOTAL=want_total,
            STORE_TMA=store_tma,
            UNIT_G=g == 1.0,
            SPLIT=self.epilogue_split,
            MIRROR=symmetric and self.mirror_diagonal,
        )
        return KernelStrip(
            w,
            sum_partials(row_part),
            sum_partials(col_part),
            dot.sum() if want_dot else None,
            total.sum() if want_total else None,
        )


def _tma_ok(t: Tensor) -> bool:
    """Tensor descriptors need a device with the copy engine (or the interpreter), 16-byte aligned
    rows and base, and a unit inner stride."""
    if t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return False
    return INTERPRETING or (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9)


def _descriptor(t: Tensor, rows: int, cols: int) -> object:
    return TensorDescriptor.from_tensor(t, [rows, cols])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 for any other (the interpreter: a persistent
    grid of 2 programs per SM-multiple, so the tests exercise the tile loop)."""
    if device.type != "cuda":
        return 2
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


PARTIAL_SUMS = "torch"
"""How `sum_partials` adds the kernels' per-tile partial buffers over their first dimension on CUDA:
"torch" (`Tensor.sum(0)`) or "triton" (`_sum_rows_kernel`). An H100 profile at N = 65,536 has 128
such sums per step taking 1.57 ms, ~12 us for 8 MiB, about a quarter of the memory bandwidth; the
Triton kernel is not yet timed on a GPU (`benchmarks/partial_sums.py` times both), hence the default."""


def sum_partials(part: Tensor, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """part.sum(0) of a contiguous float32 (P, L) partial buffer, written into `out` (L,) when given
    (added to it with `accumulate`), returned. Off CUDA, or with PARTIAL_SUMS = "torch", plain torch."""
    kernel = (
        PARTIAL_SUMS == "triton"
        and (part.is_cuda or INTERPRETING)
        and part.dim() == 2
        and part.dtype == torch.float32
        and part.is_contiguous()
        and (out is None or (out.dtype == torch.float32 and out.is_contiguous() and out.shape == part.shape[1:]))
    )
    if not kernel:
        if out is not None and not accumulate and out.dtype == part.dtype:
            return torch.sum(part, 0, out=out)  # straight into out: one launch, not a sum and a copy
        total = part.sum(0)
        return total if out is None else out.add_(total) if accumulate else out.copy_(total)
    if out is None:
        out, accumulate = torch.empty(part.shape[1:], dtype=torch.float32, device=part.device), False
    width = part.shape[1]
    block = 64 if width <= 16384 else 256  # >= ~64 programs for a (512, 4096) row partial
    if width:
        _sum_rows_kernel[(triton.cdiv(width, block),)](
            part, out, part.shape[0], width, ACCUMULATE=accumulate, BP=32, BL=block, num_warps=4
        )
    return out


HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Operand dtypes that take the tensor cores (and bfloat16 weight strips)."""


def strip_dtype(operand: torch.dtype) -> torch.dtype:
    """Weight strips: float32 for float32 operands, else bfloat16 (float16 lacks the range for tiny weights)."""
    return torch.float32 if operand == torch.float32 else torch.bfloat16
