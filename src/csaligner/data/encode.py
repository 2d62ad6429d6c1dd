"""Encode a data set with a frozen encoder into a feature cache; the `csalign encode` subcommand.

An image encoder caches one row per unique image that decodes; a text encoder one row per
caption; a dual encoder (CLIP) both, in one folder. Work is batched under inference_mode,
images are decoded by DataLoader workers, and progress bars show items/s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csaligner._validation import check_device, is_integer, numpy_hint
from csaligner.data.cache import DTYPES, FORMAT, FeatureCache
from csaligner.data.cache_writer import CacheWriter
from csaligner.data.images import ON_BAD_IMAGE, BadImageError, bad_image_report, image_loader, scan_images
from csaligner.data.manifest import ImageTextManifest
from csaligner.encoders.base import EncoderOutput, FrozenEncoder
from csaligner.encoders.registry import encoder_spec


@dataclass(frozen=True)
class EncodeConfig:
    """How to encode.

    Attributes:
        tokens: also cache token features and masks (large: N x T x D).
        dtype: storage dtype, "fp16" or "fp32".
        batch_size: items per encoder call.
        workers: DataLoader processes decoding images (0 = in the main process).
        on_bad_image: "fail" raises on missing/corrupt images (listing them all); "skip" leaves
            them out, warns with the list, and records them in cache.json.
        shard_size: rows per safetensors shard (the unit of resumption).
        overwrite: replace a cache in `out` that was built with other settings.
        progress: show tqdm progress bars on stderr.
    """

    tokens: bool = False
    dtype: str = "fp16"
    batch_size: int = 64
    workers: int = 0
    on_bad_image: str = "fail"
    shard_size: int = 2048
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # each error names the field and its `csalign encode` flag: a CLI user never wrote "batch_size"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype (--dtype) must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image (--on-bad-image) must be one of {ON_BAD_IMAGE}, got {self.on_bad_image!r}")
        for name in ("batch_size", "shard_size"):  # bool is an int subclass: batch_size=True is not a size
            if not is_integer(getattr(self, name), plain=True) or getattr(self, name) < 1:
                value = getattr(self, name)
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be an integer >= 1, got {value!r}{numpy_hint(value)}")
        if not is_integer(self.workers, plain=True) or self.workers < 0:
            raise ValueError(
                f"workers (--workers) must be an integer >= 0, got {self.workers!r}{numpy_hint(self.workers)}"
            )


class _Rows:
    """Encoder outputs accumulated across batches, cut into shard-sized pieces."""

    def __init__(self) -> None:
        self.chunks: list[EncoderOutput] = []
        self.n = 0

    def add(self, out: EncoderOutput) -> None:
        self.chunks.append(out)
        self.n += out.pooled.shape[0]

    def take(self, n: int, dtype: torch.dtype) -> dict[str, Tensor]:
        got, taken = 0, []
        while got < n:
            c = self.chunks.pop(0)
            k = min(n - got, c.pooled.shape[0])
            taken.append(_slice(c, 0, k))
            if k < c.pooled.shape[0]:
                self.chunks.insert(0, _slice(c, k, c.pooled.shape[0]))
            got += k
        self.n -= n
        return _stack(taken, dtype)


def _slice(o: EncoderOutput, a: int, b: int) -> EncoderOutput:
    return EncoderOutput(
        o.pooled[a:b], None if o.tokens is None else o.tokens[a:b], None if o.mask is None else o.mask[a:b]
    )


def _stack(outs: Sequence[EncoderOutput], dtype: torch.dtype) -> dict[str, Tensor]:
    """Concatenate outputs; tokens are right-padded to the longest (mask False on padding)."""
    res = {"pooled": torch.cat([o.pooled for o in outs]).to(dtype).cpu()}
    toks = [o.tokens for o in outs if o.tokens is not None]
    if toks:
        t, d = max(x.shape[1] for x in toks), toks[0].shape[2]
        tokens = torch.zeros(res["pooled"].shape[0], t, d, dtype=dtype)
        mask = torch.zeros(res["pooled"].shape[0], t, dtype=torch.bool)
        row = 0
        for o in outs:
            assert o.tokens is not None and o.mask is not None
            b, length = o.tokens.shape[:2]
            tokens[row : row + b, :length] = o.tokens.to(dtype).cpu()
            mask[row : row + b, :length] = o.mask.cpu()
            row += b
        res["tokens"], res["mask"] = tokens, mask
    _check_finite(outs, res, dtype)
    return res


def _check_finite(outs: Sequence[EncoderOutput], stored: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Refuse to store NaN / inf: from the encoder itself, or from values beyond the storage dtype's range."""
    for name in ("pooled", "tokens"):
        if name not in stored or bool(torch.isfinite(stored[name]).all()):
            continue
        raw = [getattr(o, name) for o in outs if getattr(o, name) is not None]
        if not all(bool(torch.isfinite(t).all()) for t in raw):
            raise FloatingPointError(
                f"the encoder returned NaN or inf {name} features; check its inputs and weights (nothing was stored)"
            )
        peak = max(float(t.abs().max()) for t in raw)
        raise FloatingPointError(
            f"{name} features reach {peak:.4g}, beyond what {dtype} stores (max {torch.finfo(dtype).max:.4g}); "
            "encode with --dtype fp32 (EncodeConfig(dtype='fp32'))"
        )


def _bar(total: int, initial: int, desc: str, unit: str, on: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not on, file=sys.stderr, smoothing=0.1)


def _encode_images(enc: FrozenEncoder, m: ImageTextManifest, w: CacheWriter, cfg: EncodeConfig) -> int:
    pending, rows = w.pending("image"), w.rows("image")
    todo = [rows[k] for s, e, _ in pending for k in range(s, e)]
    if not todo:
        return 0
    assert enc.image_preprocess is not None
    # One loader over every pending row keeps the decoding workers busy across shard boundaries.
    loader = image_loader([m.image_paths[r] for r in todo], enc.image_preprocess, cfg.batch_size, cfg.workers)
    buf, shards = _Rows(), iter(pending)
    start, stop, index = next(shards)
    with _bar(len(rows), len(rows) - len(todo), f"encode images [{enc.id}]", "img", cfg.progress) as bar:
        for batch in loader:
            buf.add(enc.encode_images(batch, tokens=cfg.tokens))
            bar.update(batch.shape[0])
            while index >= 0 and buf.n >= stop - start:
                w.write_shard("image", index, start, stop, buf.take(stop - start, DTYPES[cfg.dtype]))
                start, stop, index = next(shards, (0, 0, -1))
    return len(todo)


def _encode_texts(enc: FrozenEncoder, m: ImageTextManifest, w: CacheWriter, cfg: EncodeConfig) -> int:
    pending, rows = w.pending("text"), w.rows("text")
    done = 0
    with _bar(
        len(rows), len(rows) - sum(e - s for s, e, _ in pending), f"encode texts [{enc.id}]", "txt", cfg.progress
    ) as bar:
        for start, stop, index in pending:
            caps = [m.captions[r] for r in rows[start:stop]]
            # Length-sorted batches pad less; outputs go back to caption order below.
            order = sorted(range(len(caps)), key=lambda i: len(caps[i]))
            outs = []
            for b in range(0, len(order), cfg.batch_size):
                outs.append(enc.encode_texts([caps[i] for i in order[b : b + cfg.batch_size]], tokens=cfg.tokens))
                bar.update(outs[-1].pooled.shape[0])
            shard = _stack(outs, DTYPES[cfg.dtype])
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            w.write_shard("text", index, start, stop, {k: v[inverse] for k, v in shard.items()})
            done += len(caps)
    return done


def cache_key_fields(
    encoder_id: str,
    image_preprocess: dict[str, object] | None,
    text_max_length: int | None,
    manifest: ImageTextManifest,
    parts: Sequence[str],
    cfg: EncodeConfig,
) -> dict[str, Any]:
    """The fields a cache's key hashes (`cache_key`): what the features depend on. Built here only, so that a
    caller that knows an encoder's identity without loading it (`csalign demo` rerun) gets the same key."""
    return {
        "format": FORMAT,
        "encoder": encoder_id,
        "image_preprocess": image_preprocess if "image" in parts else None,
        "text_max_length": text_max_length if "text" in parts else None,
        "manifest": manifest.content_hash(),
        "dtype": cfg.dtype,
        "tokens": cfg.tokens,
        "parts": list(parts),
    }


def encode_manifest(
    encoder: FrozenEncoder, manifest: ImageTextManifest, out: str | Path, config: EncodeConfig | None = None
) -> FeatureCache:
    """Encode `manifest` with `encoder` into the cache folder `out`, resuming an interrupted run.

    Returns:
        the finished, verified cache; `cache.state["last_run"]` has rows and seconds per part.
    """
    cfg = config or EncodeConfig()
    parts = []
    if encoder.modality in ("image", "both") and manifest.num_images:
        parts.append("image")
    if encoder.modality in ("text", "both") and manifest.num_texts:
        parts.append("text")
    if not parts:
        what = "images" if encoder.modality == "image" else "captions"
        raise ValueError(f"{manifest.name or 'the data'} has no {what} for the {encoder.modality} encoder {encoder.id}")
    rows: dict[str, list[int]] = {}
    skipped: list[dict[str, Any]] = []
    if "image" in parts:
        bad = scan_images(manifest.image_paths, manifest.image_ids, cfg.workers, cfg.progress)
        if bad and cfg.on_bad_image == "fail":
            raise BadImageError(bad, manifest.num_images)
        if bad:
            report = bad_image_report(bad, manifest.num_images, outcome=" and will be left out of the cache")
            warnings.warn(
                f"{report}\nfix or replace them and encode again with --overwrite (EncodeConfig(overwrite=True)) to "
                "include them; until then their captions are dropped when this cache is paired with a text cache",
                stacklevel=2,
            )
        skipped = [asdict(b) for b in bad]
        bad_rows = {b.row for b in bad}
        rows["image"] = [i for i in range(manifest.num_images) if i not in bad_rows]
        if not rows["image"]:
            raise ValueError(f"none of the {manifest.num_images} images could be read; nothing to encode")
    if "text" in parts:
        rows["text"] = list(range(manifest.num_texts))
    preprocess = encoder.image_preprocess.describe() if encoder.image_preprocess else None
    key_fields = cache_key_fields(encoder.id, preprocess, encoder.text_max_length, manifest, parts, cfg)
    extra = {"source": manifest.name, "skipped_images": skipped, "embed_dim": encoder.embed_dim}
    if (spec := encoder_spec(encoder)) is not None:  # not in the key: the same weights may move
        extra["encoder_spec"] = spec
    writer = CacheWriter(out, key_fields, manifest, rows, cfg.shard_size, extra, cfg.overwrite)
    if writer.complete:  # same key, already finished: verify and reuse
        cache = FeatureCache.open(out, expected_key=writer.key)
        cache.state["last_run"] = {}
        return cache
    last_run: dict[str, Any] = {}
    for part, fn in (("image", _encode_images), ("text", _encode_texts)):
        if part in parts:
            t0 = time.perf_counter()
            n = fn(encoder, manifest, writer, cfg)
            last_run[part] = {"rows": n, "seconds": round(time.perf_counter() - t0, 3)}
    writer.state["last_run"] = last_run
    return writer.finish()


def describe_pairing(manifest: ImageTextManifest) -> str | None:
    """One line counting the image-only and text-only rows of an image-text manifest (None for a set without
    captions, e.g. class folders): a manifest row with an empty caption or image is kept unpaired, and
    `csalign train` uses unpaired rows only in the divergence term, so a user should see how many there are."""
    if not manifest.num_texts:
        return None
    image_only = manifest.num_images - len({t for t in manifest.text_to_image if t >= 0})
    text_only = sum(1 for t in manifest.text_to_image if t < 0)
    line = f"data: {manifest.num_images} images, {manifest.num_texts} captions"
    if not image_only and not text_only:
        return line + "; every image has a caption and every caption an image"
    return (
        f"{line}; unpaired: {image_only} image-only (images without a caption: rows with an empty caption), "
        f"{text_only} text-only (captions without an image: rows with an empty image); `csalign train` puts "
        "them only in the divergence term's unpaired pools"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="encode a data set with a frozen encoder into a feature cache",
        description="Encode images and/or captions into safetensors shards (resumable, keyed, checksummed). "
        "DATA is flickr8k:train|dev[:N], flowers:train|test[:N], a manifest (.tsv/.csv/.jsonl/.parquet) "
        "or a class-folder directory.",
    )
    p.add_argument("--encoder", required=True, help="encoder name, e.g. efficientnet-lite0, minilm, hf-clip:<dir>")
    p.add_argument("--data", required=True, help="data spec or manifest path (see above)")
    p.add_argument("--out", required=True, type=Path, help="cache folder to create or resume")
    p.add_argument("--tokens", action="store_true", help="also cache token features and masks")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="storage dtype (default fp16)")
    p.add_argument("--batch-size", type=int, default=64, help="images or captions per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default 0: main process)")
    p.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="fail", help="missing/corrupt images (default fail)")
    p.add_argument("--shard-size", type=int, default=2048, help="rows per shard (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.add_argument("--device", default="cpu", help="device the encoder runs on (default cpu)")
    p.add_argument(
        "--data-root", type=Path, default=None, help="root of the built-in data sets (default $CSALIGN_DATA)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, also none from loading the model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from csaligner.data.datasets import resolve_dataset
    from csaligner.encoders import get_encoder
    from csaligner.encoders.hf_quiet import quiet_hf_libraries, silence_imported_hf_libraries

    cfg = EncodeConfig(
        tokens=args.tokens,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        on_bad_image=args.on_bad_image,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    check_device("--device", args.device)
    manifest = resolve_dataset(args.data, args.data_root)
    # --quiet also silences the model libraries (their loading bars), for this run only; it imports none of
    # them: the built-in loaders silence what they import, and the call after loading catches the rest
    with quiet_hf_libraries() if args.quiet else contextlib.nullcontext():
        encoder = get_encoder(args.encoder, device=args.device)
        silence_imported_hf_libraries()  # e.g. a registered encoder's transformers, while it encodes
        cache = encode_manifest(encoder, manifest, args.out, cfg)
    for part in cache.parts:
        info, run_ = cache.state["parts"][part], cache.state["last_run"].get(part, {})
        rate = run_.get("rows", 0) / run_["seconds"] if run_.get("seconds") else 0.0
        # a rerun on a finished cache: "encoded 0 now in 0.0s (0.0/s)" read like a failure
        done = (
            f"encoded {run_.get('rows', 0)} now in {run_.get('seconds', 0):.1f}s ({rate:.1f}/s)"
            if run_.get("rows")
            else "all already encoded with these settings, nothing to do"
        )
        print(f"{part}: {info['count']} rows, dim {info.get('dim')}, {len(info['shards'])} shards; {done}")
    if (pairing := describe_pairing(manifest)) is not None:
        print(pairing)
    if cache.skipped_images:
        print(f"skipped {len(cache.skipped_images)} unreadable images (listed in {args.out / 'cache.json'})")
    print(f"cache: {args.out} key {cache.key[:16]}")
    return 0
