"""The feature cache on disk: safetensors shards plus a JSON manifest, keyed and checksummed.

Layout of a cache folder:

    cache.json                 format, key + the fields it hashes, per-part rows and shard table
                               (start, stop, sha256), skipped images, complete flag
    items.json                 the data manifest (image ids/paths, captions, links, labels)
    image-00000.safetensors    "pooled" (n, D) [+ "tokens" (n, T, D_tok), "mask" (n, T) bool]
    text-00000.safetensors     same for captions (T = longest caption of the shard)

Each shard is written to a temp file and renamed, so a shard file exists only when complete; an
interrupted run resumes by skipping the shards already there. The key hashes encoder id (with
weight hash), preprocessing, the manifest's content hash, dtype and tokens; opening a cache
with another expected key is an error, never silent reuse. Readers go through safe_open (mmap).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from csaligner._file_mode import apply_default_mode
from csaligner._safetensors_io import save_safetensors
from csaligner.data.manifest import ImageTextManifest
from csaligner.encoders.base import encoder_name

FORMAT = "csaligner-feature-cache/1"
CACHE_FILE = "cache.json"
ITEMS_FILE = "items.json"
PARTS = ("image", "text")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class CacheKeyError(ValueError):
    """The cache on disk was built from other settings than the ones expected."""


class CacheIntegrityError(ValueError):
    """A cache is incomplete or a shard is missing or altered."""


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `fields`."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def key_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    """Human-readable list of the key fields that differ."""
    keys = sorted(set(have) | set(want))
    return "; ".join(
        f"{k}: cache has {have.get(k)!r}, expected {want.get(k)!r}" for k in keys if have.get(k) != want.get(k)
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    apply_default_mode(fd)  # mkstemp makes it 0600: cache.json must be as readable as the shards it lists
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def to_ranges(rows: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 3], [5, 7]]: compact JSON for row lists with few gaps (skipped images)."""
    out: list[list[int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def from_ranges(ranges: list[list[int]]) -> list[int]:
    return [r for a, b in ranges for r in range(a, b)]


def shard_file(part: str, index: int) -> str:
    return f"{part}-{index:05d}.safetensors"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FeatureCache:
    """A finished (verified) cache folder. Build one with `csaligner.data.encode.encode_manifest`."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.directory = directory
        self.state = state
        self._manifest: ImageTextManifest | None = None

    @classmethod
    def open(cls, directory: str | Path, expected_key: str | None = None, verify: bool = True) -> FeatureCache:
        """Open a finished cache; check the key, the row counts and (verify=True) every shard's sha256."""
        d = Path(directory)
        if not (d / CACHE_FILE).is_file():
            raise FileNotFoundError(f"no feature cache at {d} ({CACHE_FILE} missing); build one with `csalign encode`")
        state = json.loads((d / CACHE_FILE).read_text())
        if state.get("format") != FORMAT:
            raise CacheIntegrityError(f"{d}: unknown cache format {state.get('format')!r}, expected {FORMAT!r}")
        if expected_key is not None and state["key"] != expected_key:
            raise CacheKeyError(f"{d} was built with other settings: {state['key'][:12]} != {expected_key[:12]}")
        if not state.get("complete"):
            raise CacheIntegrityError(
                f"{d} is incomplete (encoding was interrupted); rerun the same `csalign encode` command to resume"
            )
        cache = cls(d, state)
        # cache.json and items.json are checked against the key too, not only the shards.
        if cache_key(state["key_fields"]) != state["key"]:
            raise CacheIntegrityError(f"{d / CACHE_FILE} was edited: its key does not match its key fields")
        if cache.manifest.content_hash() != state["key_fields"]["manifest"]:
            raise CacheIntegrityError(f"{d / ITEMS_FILE} does not match the manifest hash in the key; it was altered")
        cache.check(verify)
        return cache

    def check(self, checksums: bool = True) -> None:
        """Counts and shard coverage always; per-shard sha256 and embedded key when `checksums`."""
        for part, info in self.state["parts"].items():
            spans = sorted((s["start"], s["stop"]) for s in info["shards"].values())
            ends = [0] + [stop for _, stop in spans]
            if [start for start, _ in spans] != ends[:-1] or ends[-1] != info["count"]:
                raise CacheIntegrityError(
                    f"{self.directory}: {part} shards {spans} do not cover rows "
                    f"0..{info['count']}; re-encode with --overwrite"
                )
            for s in info["shards"].values():
                path = self.directory / s["file"]
                if not path.is_file():
                    raise CacheIntegrityError(
                        f"{self.directory}: shard {s['file']} is missing; re-encode with --overwrite"
                    )
                if checksums and file_sha256(path) != s["sha256"]:
                    raise CacheIntegrityError(
                        f"{path} does not match its sha256 in {CACHE_FILE}; it was altered or "
                        "truncated; re-encode with --overwrite"
                    )
                if checksums:
                    with safe_open(str(path), framework="pt") as f:
                        meta = f.metadata() or {}
                        n = f.get_slice("pooled").get_shape()[0]
                    if meta.get("key") != self.key or n != s["stop"] - s["start"]:
                        raise CacheIntegrityError(
                            f"{path} belongs to another cache or has {n} rows, expected {s['stop'] - s['start']}"
                        )

    @property
    def key(self) -> str:
        return str(self.state["key"])

    @property
    def key_fields(self) -> dict[str, Any]:
        return dict(self.state["key_fields"])

    @property
    def encoder_spec(self) -> str:
        """How to load the encoder again ("hf-text:/abs/dir"); caches from before it was recorded give
        the registered name from the id ("minilm@..." -> "minilm"), which loads for argument-less encoders."""
        spec = self.state.get("encoder_spec")
        return str(spec) if spec else encoder_name(str(self.state["key_fields"]["encoder"]))

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.state["parts"])

    @property
    def manifest(self) -> ImageTextManifest:
        if self._manifest is None:
            self._manifest = ImageTextManifest.from_json(json.loads((self.directory / ITEMS_FILE).read_text()))
        return self._manifest

    @property
    def skipped_images(self) -> list[dict[str, Any]]:
        return list(self.state.get("skipped_images", []))

    def rows(self, part: str) -> list[int]:
        """Manifest rows (image rows or caption rows) of the cached rows, in order."""
        return from_ranges(self._part(part)["rows"])

    def has_tokens(self, part: str) -> bool:
        return bool(self._part(part)["tokens"])

    def _part(self, part: str) -> dict[str, Any]:
        if part not in self.state["parts"]:
            raise ValueError(
                f"{self.directory} has no {part} features (it has {list(self.state['parts'])}); "
                f"encode the data with {'an image' if part == 'image' else 'a text'} encoder"
            )
        return dict(self.state["parts"][part])

    def _shard_paths(self, part: str) -> Iterator[Path]:
        shards = sorted(self._part(part)["shards"].values(), key=lambda s: s["start"])
        for s in shards:
            yield self.directory / s["file"]

    def pooled(self, part: str, dtype: torch.dtype | None = None) -> Tensor:
        """(rows, D) pooled features of `part` ("image" or "text")."""
        chunks = []
        for path in self._shard_paths(part):
            with safe_open(str(path), framework="pt") as f:
                chunks.append(f.get_tensor("pooled"))
        if not chunks:
            return torch.empty(0, int(self._part(part)["dim"]), dtype=dtype or torch.float32)
        out = torch.cat(chunks)
        return out if dtype is None else out.to(dtype)

    def tokens(self, part: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(rows, T, D_tok) token features padded to the longest shard, and the (rows, T) bool mask."""
        if not self.has_tokens(part):
            raise ValueError(f"{self.directory} has no {part} tokens; encode with --tokens")
        toks, masks = [], []
        for path in self._shard_paths(part):
            with safe_open(str(path), framework="pt") as f:
                toks.append(f.get_tensor("tokens"))
                masks.append(f.get_tensor("mask"))
        n, t = sum(x.shape[0] for x in toks), max(x.shape[1] for x in toks)
        out = torch.zeros(n, t, toks[0].shape[2], dtype=dtype or toks[0].dtype)
        mask = torch.zeros(n, t, dtype=torch.bool)
        row = 0
        for x, m in zip(toks, masks, strict=True):
            out[row : row + x.shape[0], : x.shape[1]] = x
            mask[row : row + x.shape[0], : x.shape[1]] = m
            row += x.shape[0]
        return out, mask


def as_cache(cache: str | Path | FeatureCache, verify: bool = True) -> FeatureCache:
    """`cache` itself when it is an opened `FeatureCache`, else `FeatureCache.open(cache, verify=verify)`.

    Opening reads cache.json and items.json and hashes the manifest (with `verify`, every shard too): a
    command that needs several things from one cache opens it once and passes the opened cache along.
    """
    return cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache, verify=verify)


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
        state = json.loads(path.read_text())
        same = state.get("key") == self.key and {p: from_ranges(i["rows"]) for p, i in state["parts"].items()} == rows
        if same:
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
