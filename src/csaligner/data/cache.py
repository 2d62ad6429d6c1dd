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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

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


def read_cache_json(path: Path) -> dict[str, Any]:
    """cache.json or items.json as a dict; a damaged file is a `CacheIntegrityError` naming it and the fix.

    Both are written atomically, so a damaged one was edited or truncated by hand (or by a copy that stopped).
    """
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CacheIntegrityError(
            f"{path} is not valid JSON ({err}); the cache is damaged: re-encode it with `csalign encode ... "
            f"--overwrite --out {path.parent}`"
        ) from err
    if not isinstance(obj, dict):
        raise CacheIntegrityError(
            f"{path} holds a JSON {type(obj).__name__}, not an object; the cache is damaged: re-encode it with "
            f"`csalign encode ... --overwrite --out {path.parent}`"
        )
    return obj


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
            spec = str(directory)
            hint = (  # "flickr8k:dev" is a --data spec: the cache is the folder encoding it makes
                f" (a --data spec is not a cache: csalign encode --data {spec} --out DIR, then pass DIR)"
                if ":" in spec and spec.split(":", 1)[0] in ("flickr8k", "flowers") and not d.exists()
                else ""
            )
            raise FileNotFoundError(
                f"no feature cache at {d} ({CACHE_FILE} missing); build one with `csalign encode`{hint}"
            )
        state = read_cache_json(d / CACHE_FILE)
        if state.get("format") != FORMAT:
            raise CacheIntegrityError(f"{d}: unknown cache format {state.get('format')!r}, expected {FORMAT!r}")
        missing = [k for k in ("key", "key_fields", "parts") if k not in state]
        missing += [f"key_fields.{k}" for k in ("manifest", "encoder") if k not in state.get("key_fields", {})]
        if missing:
            raise CacheIntegrityError(
                f"{d / CACHE_FILE} lacks {missing}; the cache is damaged: re-encode it with "
                f"`csalign encode ... --overwrite --out {d}`"
            )
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
            path = self.directory / ITEMS_FILE
            if not path.is_file():
                raise CacheIntegrityError(
                    f"{self.directory} has no {ITEMS_FILE} (the list of its images and captions); the cache is "
                    f"damaged: re-encode it with `csalign encode ... --overwrite --out {self.directory}`"
                )
            obj = read_cache_json(path)
            try:
                self._manifest = ImageTextManifest.from_json(obj)
            except (KeyError, TypeError, ValueError) as err:
                raise CacheIntegrityError(
                    f"{path} is not a data manifest ({type(err).__name__}: {err}); the cache is damaged: "
                    f"re-encode it with `csalign encode ... --overwrite --out {self.directory}`"
                ) from err
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


def __getattr__(name: str) -> Any:
    # CacheWriter moved to cache_writer.py (which imports this module, hence lazily); old imports keep working.
    if name == "CacheWriter":
        from csaligner.data.cache_writer import CacheWriter

        return CacheWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
