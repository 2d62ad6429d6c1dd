"""Byte-for-byte deterministic safetensors files: the same tensors and metadata give the same bytes.

safetensors (0.4 - 0.8 at least) hands the metadata dict to Rust as a `HashMap<String, String>`, and
Rust seeds every HashMap with fresh random keys, so the header lists the metadata keys in an order
that changes from one save to the next, even within one process (PYTHONHASHSEED plays no part). Two
saves of the same adapter or cache shard then differ in bytes and in sha256. The tensor entries are
already in a fixed order (by dtype alignment, then name). Here every file is written by safetensors
and its header is then rewritten canonically: `__metadata__` first with its keys sorted, compact
JSON, padded with spaces to a multiple of 8 bytes as safetensors pads it. The data bytes are untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import Tensor

from csaligner._file_mode import apply_default_mode

_LEN_BYTES = 8  # the header length, little-endian u64, opens every safetensors file
_ALIGN = 8  # safetensors pads the header with spaces so the data starts 8-byte aligned


def canonical_header(header: bytes) -> bytes:
    """The header JSON with `__metadata__` first and sorted, compact separators, space-padded to 8 bytes.

    Args:
        header: the header bytes of a safetensors file (JSON, possibly followed by padding spaces).
    """
    entries = json.loads(header)
    meta = entries.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | entries
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % _ALIGN)


def _split(data: bytes, where: str) -> tuple[int, bytes]:
    """(header length, header bytes) of a safetensors file whose first bytes are `data`."""
    if len(data) < _LEN_BYTES:
        raise ValueError(f"{where} is not a safetensors file: {len(data)} bytes, shorter than the 8-byte header size")
    n = int.from_bytes(data[:_LEN_BYTES], "little")
    header = data[_LEN_BYTES : _LEN_BYTES + n]
    if len(header) != n:
        raise ValueError(f"{where} is truncated: its header says {n} bytes, {len(header)} are there")
    return n, header


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` with a canonical header: equal inputs give equal bytes.

    Args:
        tensors: name -> contiguous CPU tensor.
        metadata: string -> string, stored in the header under `__metadata__`.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n, header = _split(data, "safetensors.save output")
    fixed = canonical_header(header)
    if fixed == header:
        return data
    return len(fixed).to_bytes(_LEN_BYTES, "little") + fixed + data[_LEN_BYTES + n :]


def canonicalize_file(path: str | os.PathLike[str]) -> None:
    """Rewrite the header of the safetensors file at `path` canonically (see `canonical_header`).

    A header of the same length is overwritten in place, so a large shard is not copied; otherwise
    the file is rebuilt next to `path` and renamed over it.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        head = f.read(_LEN_BYTES)
        size = int.from_bytes(head, "little") if len(head) == _LEN_BYTES else 0
        n, header = _split(head + f.read(size), str(path))
        fixed = canonical_header(header)
        if fixed == header:
            return
        if len(fixed) == n:
            f.seek(_LEN_BYTES)
            f.write(fixed)
            return
        tmp = path.with_name(f".{path.name}.header-{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                out.write(len(fixed).to_bytes(_LEN_BYTES, "little") + fixed)
                shutil.copyfileobj(f, out, 1 << 22)  # f is positioned at the first data byte
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file` with a canonical header: equal inputs give equal bytes.

    Args:
        tensors: name -> contiguous tensor.
        path: the file to write (callers that need atomicity pass a temporary name and rename it).
        metadata: string -> string, stored in the header under `__metadata__`.

    The file ends with mode 0o666 & ~umask like any file `open` creates; `save_file` alone leaves 0600,
    which other users on a shared machine cannot read.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    canonicalize_file(path)
    apply_default_mode(path)
