"""Checks and small helpers shared by the evaluation metrics (private)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 stays float64; bf16, fp16 and fp32 are all evaluated in float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def unit_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """L2-normalise rows in `dtype` (an all-zero row stays zero and scores 0 against everything)."""
    return F.normalize(x.detach().to(dtype), dim=-1)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Recall cut-offs: a non-empty sequence of distinct ints >= 1."""
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out) or len(set(out)) != len(out):
        raise ValueError(f"ks must be distinct integers >= 1, e.g. (1, 5, 10); got {tuple(ks)!r}")
    return out


def check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (queries per block), got {chunk_size!r}")
    return int(chunk_size)


def check_index(
    name: str,
    index: Tensor,
    length: int,
    n_targets: int,
    allow_unpaired: bool = True,
    device: torch.device | None = None,
) -> Tensor:
    """Validate a (length,) integer map into [0, n_targets); -1 marks "no target" when allowed.

    Returns the index as int64, on `device` when given (else on its own device).
    """
    if not isinstance(index, Tensor):  # checked before any .to(device), which a list does not have
        raise TypeError(
            f"{name} must be a torch.Tensor of integer indices, got {type(index).__name__}; "
            f"convert it with torch.as_tensor({name})"
        )
    if device is not None:
        index = index.to(device)
    if index.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one entry per row), got {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.dtype.is_complex:
        raise ValueError(f"{name} must hold integer indices, got dtype {index.dtype}; cast it with .long()")
    index = index.long()
    lo = -1 if allow_unpaired else 0
    if length and (int(index.min()) < lo or int(index.max()) >= n_targets):
        allowed = f"[0, {n_targets - 1}]" + (" or -1 for unpaired" if allow_unpaired else "")
        raise ValueError(f"{name} values must lie in {allowed}, got range [{int(index.min())}, {int(index.max())}]")
    return index


def check_labels(
    name: str, labels: Tensor, n: int, num_classes: int | None = None, device: torch.device | None = None
) -> Tensor:
    """Class labels: (n,) integers in [0, num_classes) (any non-negative int when None). Returns int64, on
    `device` when given."""
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}; "
            f"convert it with torch.as_tensor({name})"
        )
    if device is not None:
        labels = labels.to(device)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one label per embedding row), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}; cast it with .long()")
    labels = labels.long()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} must lie in {bound} (one class per text embedding), got range [{lo}, {hi}]")
    return labels


def subsample_rows(n: int, max_rows: int, generator: torch.Generator) -> Tensor:
    """Indices of at most `max_rows` of n rows, drawn without replacement (all rows, in order, if n fits)."""
    if n <= max_rows:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:max_rows].sort().values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
    return float(t.mean()), std


def as_number(value: object) -> int | float | None:
    """`value` as a Python int or float when it is one number (int, float, numpy scalar, 0-d tensor or
    array), else None (a sequence of per-seed values, or not a number)."""
    if isinstance(value, int | float):  # bool too: an int
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # numpy floats (float32 is not a float subclass)
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d torch tensor / numpy array
        item = value.item()
        return item if isinstance(item, int | float) else None
    return None


def per_seed_values(value: object) -> list[float]:
    """The floats of a sequence of per-seed values (a list, 1-d tensor or array)."""
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else [None]
    numbers_ = [as_number(v) for v in items]
    if any(n is None for n in numbers_):
        raise TypeError(
            f"a table value must be a number or a sequence of per-seed numbers, got {type(value).__name__} {value!r}"
        )
    return [float(n) for n in numbers_ if n is not None]


def text_file_entries(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a file's non-blank lines that are not "#" comments, stripped."""
    try:
        # utf-8-sig: Notepad and PowerShell 5 open a UTF-8 file with a byte-order mark, no part of the first line
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from err
    stripped = ((n, line.strip()) for n, line in enumerate(lines, 1))
    return [(n, text) for n, text in stripped if text and not text.startswith("#")]
