"""Writing a feature cache: shards saved atomically, cache.json kept current so a rerun resumes.

The layout and the reader are in `csaligner.data.cache`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from csaligner._file_mode import apply_default_mode
from csaligner._safetensors_io import save_safetensors
from csaligner.data.cache import (
    CACHE_FILE,
    FORMAT,
    ITEMS_FILE,
    CacheIntegrityError,
    CacheKeyError,
    FeatureCache,
    cache_key,
    file_sha256,
    from_ranges,
    key_diff,
    read_cache_json,
    shard_file,
    to_ranges,
)
from csaligner.data.manifest import ImageTextManifest


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    apply_default_mode(fd)  # mkstemp makes it 0600: cache.json must be as readable as the shards it lists
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CacheWriter:
    """Writes shards atomically and keeps cache.json current, so a rerun resumes.

    Args:
        directory: the cache folder (created).
        key_fields: what the key hashes; compared field by field with an existing cache.
        manifest: the data, saved as items.json.
        rows: part -> manifest rows to encode (images that decode, every caption).
        shard_size: rows per shard (an existing cache keeps its own).
        extra: more JSON-able state (skipped images, source, encoder info).
        overwrite: replace an existing cache built with other settings instead of failing.
    """

    def __init__(
        self,
        directory: str | Path,
        key_fields: dict[str, Any],
        manifest: ImageTextManifest,
        rows: dict[str, list[int]],
        shard_size: int,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        key_fields = json.loads(json.dumps(key_fields))  # tuples -> lists, so comparisons with disk are exact
        self.key = cache_key(key_fields)
        old = self._existing(key_fields, rows, overwrite)
        self.directory.mkdir(parents=True, exist_ok=True)
        if old is None:
            parts = {
                p: {"count": len(r), "rows": to_ranges(r), "shards": {}, "tokens": bool(key_fields.get("tokens"))}
                for p, r in rows.items()
            }
            old = {
                "format": FORMAT,
                "key": self.key,
                "key_fields": key_fields,
                "complete": False,
                "shard_size": shard_size,
                "created": _now(),
                "parts": parts,
                **(extra or {}),
            }
            _atomic_write_json(self.directory / ITEMS_FILE, manifest.to_json())
        self.state: dict[str, Any] = old
        self._adopt_orphans()
        self._save()

    def _existing(self, key_fields: dict[str, Any], rows: dict[str, list[int]], overwrite: bool) -> dict | None:
        path = self.directory / CACHE_FILE
        if not path.is_file():
            if self.directory.is_dir() and any(self.directory.iterdir()) and not overwrite:
                raise CacheKeyError(f"{self.directory} exists and is not a feature cache; choose an empty --out")
            return None
        try:
            state = read_cache_json(path)
            parts = {p: from_ranges(i["rows"]) for p, i in state["parts"].items()}
        except (CacheIntegrityError, KeyError, TypeError, AttributeError) as err:
            if not overwrite:  # damaged by hand or by an interrupted copy: nothing in it can be trusted to resume
                raise CacheIntegrityError(
                    f"{path} is damaged ({type(err).__name__}: {err}), so the cache cannot be resumed; "
                    "pass --overwrite to encode it again"
                ) from err
            state, parts = {}, {}
        if state.get("key") == self.key and parts == rows:
            return dict(state)
        if not overwrite:
            why = key_diff(state.get("key_fields", {}), key_fields) or "the images that decode changed"
            raise CacheKeyError(
                f"{self.directory} holds a cache built with other settings ({why}); "
                "use another --out, or --overwrite to replace it"
            )
        for f in self.directory.glob("*.safetensors"):
            f.unlink()
        for name in (CACHE_FILE, ITEMS_FILE):
            (self.directory / name).unlink(missing_ok=True)
        return None

    def _adopt_orphans(self) -> None:
        """A shard renamed into place just before a crash is complete; record it (after checking its key)."""
        for part, start, stop, index in self.all_shards():
            name = shard_file(part, index)
            path = self.directory / name
            if str(index) in self.state["parts"][part]["shards"] or not path.is_file():
                continue
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == self.key and meta.get("start") == str(start) and meta.get("stop") == str(stop):
                self._record(part, index, start, stop, path)

    def _record(self, part: str, index: int, start: int, stop: int, path: Path) -> None:
        self.state["parts"][part]["shards"][str(index)] = {
            "file": path.name,
            "start": start,
            "stop": stop,
            "sha256": file_sha256(path),
        }

    def _save(self) -> None:
        _atomic_write_json(self.directory / CACHE_FILE, self.state)

    def rows(self, part: str) -> list[int]:
        return from_ranges(self.state["parts"][part]["rows"])

    @property
    def complete(self) -> bool:
        return bool(self.state["complete"])

    def all_shards(self) -> list[tuple[str, int, int, int]]:
        """(part, start, stop, index) for every shard of the cache."""
        size = int(self.state["shard_size"])
        out = []
        for part, info in self.state["parts"].items():
            n = int(info["count"])
            out += [(part, s, min(s + size, n), i) for i, s in enumerate(range(0, n, size))]
        return out

    def pending(self, part: str) -> list[tuple[int, int, int]]:
        """(start, stop, index) of the shards of `part` still to encode."""
        done = self.state["parts"][part]["shards"]
        return [(s, e, i) for p, s, e, i in self.all_shards() if p == part and str(i) not in done]

    def write_shard(self, part: str, index: int, start: int, stop: int, tensors: dict[str, Tensor]) -> None:
        """Save one shard: temp file, then rename, then record its sha256 in cache.json."""
        n = tensors["pooled"].shape[0]
        if n != stop - start:
            raise ValueError(f"shard {part}-{index} has {n} rows, expected {stop - start}")
        path = self.directory / shard_file(part, index)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"key": self.key, "part": part, "start": str(start), "stop": str(stop)}
        # canonical header: a rebuilt shard has the same bytes, so the same sha256 in cache.json
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        info = self.state["parts"][part]
        info["dim"] = int(tensors["pooled"].shape[1])
        if "tokens" in tensors:
            info["token_dim"] = int(tensors["tokens"].shape[2])
        self._record(part, index, start, stop, path)
        self._save()

    def finish(self) -> FeatureCache:
        """Mark complete (all shards written) and return the opened cache."""
        left = [(p, i) for p, _, _, i in self.all_shards() if str(i) not in self.state["parts"][p]["shards"]]
        if left:
            raise CacheIntegrityError(
                f"cannot finish {self.directory}: {len(left)} shards not written, e.g. {left[:3]}"
            )
        self.state["complete"] = True
        self.state["finished"] = _now()
        self._save()
        return FeatureCache(self.directory, self.state)


def remove_cache(directory: str | Path) -> None:
    """Delete a cache folder written by CacheWriter (refuses folders that are not caches)."""
    d = Path(directory)
    if not (d / CACHE_FILE).is_file():
        raise ValueError(f"{d} is not a feature cache ({CACHE_FILE} missing); not deleting it")
    shutil.rmtree(d)
