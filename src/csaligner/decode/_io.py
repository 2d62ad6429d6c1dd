"""File helpers shared by the decode CLIs: tensors from safetensors, one-item-per-line lists, dtypes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_tensor(path: str | Path, key: str) -> Tensor:
    """Read one tensor from a safetensors file, with errors that list what the file holds."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if key not in keys:
            raise ValueError(f"{path} has no tensor named '{key}' (it holds {keys}); save it under the key '{key}'")
        return f.get_tensor(key)


def has_tensor(path: str | Path, key: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return key in set(f.keys())


def read_lines(path: str | Path, what: str) -> list[str]:
    """Read a one-item-per-line text file; blank lines are errors since rows are matched by position."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such {what} file: {path}")
    try:
        # utf-8-sig: a byte-order mark (Notepad, PowerShell 5) is no part of the first prompt
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from err
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(
            f"{path} has blank lines (lines {blank[:5]}); write one {what} per line, since line i pairs with row i"
        )
    if not lines:
        raise ValueError(f"{path} is empty; write one {what} per line")
    return [line.strip() for line in lines]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]
