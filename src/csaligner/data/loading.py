"""From feature caches to what training and evaluation consume: `PairedFeatures`, class features."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from csaligner.data.cache import FeatureCache, as_cache
from csaligner.data.features import PairedFeatures


def load_paired_features(
    image_cache_dir: str | Path,
    text_cache_dir: str | Path,
    *,
    tokens: bool = True,
    dtype: torch.dtype | None = torch.float32,
    verify: bool = True,
) -> PairedFeatures:
    """Join an image cache and a text cache built from the same manifest.

    Both folders may be the same (a dual encoder such as CLIP). Images skipped as unreadable at
    encoding time are left out together with their captions, with a warning and a count in `meta`.

    Args:
        image_cache_dir: cache with an "image" part.
        text_cache_dir: cache with a "text" part, from the same manifest (same content hash).
        tokens: load token features and masks when the caches have them.
        dtype: cast features to this dtype (None keeps the stored fp16/fp32).
        verify: check per-shard sha256 checksums while opening.

    Returns:
        PairedFeatures with image (N, D_img), text (M, D_txt), text_to_image (-1 for unpaired
        captions), image_ids, captions, and tokens when cached and requested.
    """
    img = FeatureCache.open(image_cache_dir, verify=verify)
    txt = (
        img
        if Path(text_cache_dir).resolve() == img.directory.resolve()
        else FeatureCache.open(text_cache_dir, verify=verify)
    )
    if img.key_fields["manifest"] != txt.key_fields["manifest"]:
        raise ValueError(
            f"{image_cache_dir} and {text_cache_dir} were encoded from different data "
            f"({img.state.get('source')!r} vs {txt.state.get('source')!r}; manifest hashes "
            f"{img.key_fields['manifest'][:12]} != {txt.key_fields['manifest'][:12]}); encode both from the same --data"
        )
    m = img.manifest
    image_rows = img.rows("image")
    caption_rows = txt.rows("text")
    remap = torch.full((m.num_images,), -1, dtype=torch.long)
    remap[torch.tensor(image_rows, dtype=torch.long)] = torch.arange(len(image_rows))
    t2i_all = torch.tensor([m.text_to_image[r] for r in caption_rows], dtype=torch.long)
    linked = remap[t2i_all.clamp_min(0)]
    # A caption survives unless its image was skipped; unpaired captions (-1) always survive.
    keep = (t2i_all < 0) | (linked >= 0)
    dropped = int((~keep).sum())
    if dropped:
        warnings.warn(
            f"{len(img.skipped_images)} unreadable images were skipped at encoding; dropping their {dropped} captions",
            stacklevel=2,
        )
    kt = keep.nonzero().flatten()
    t2i = torch.where(t2i_all < 0, t2i_all, linked)[kt]

    def cast(x: Tensor) -> Tensor:
        return x if dtype is None else x.to(dtype)

    image_tokens = image_mask = text_tokens = text_mask = None
    if tokens and img.has_tokens("image"):
        image_tokens, image_mask = img.tokens("image", dtype)
    if tokens and txt.has_tokens("text"):
        tt, tm = txt.tokens("text", dtype)
        text_tokens, text_mask = tt[kt], tm[kt]
    image = _finite_rows(img, "image", cast(img.pooled("image")), [m.image_ids[r] for r in image_rows])
    text = _finite_rows(txt, "text", cast(txt.pooled("text")), [repr(m.captions[r]) for r in caption_rows])
    return PairedFeatures(
        image=image,
        text=text[kt],
        text_to_image=t2i,
        image_ids=[m.image_ids[r] for r in image_rows],
        captions=[m.captions[caption_rows[j]] for j in kt.tolist()],
        image_tokens=image_tokens,
        image_token_mask=image_mask,
        text_tokens=text_tokens,
        text_token_mask=text_mask,
        meta={
            "image_encoder": img.key_fields["encoder"],
            "text_encoder": txt.key_fields["encoder"],
            "image_encoder_spec": img.encoder_spec,
            "text_encoder_spec": txt.encoder_spec,
            "image_cache_key": img.key,
            "text_cache_key": txt.key,
            "manifest": img.key_fields["manifest"],
            "source": img.state.get("source", ""),
            "skipped_images": [s["image_id"] for s in img.skipped_images],
            "dropped_captions": dropped,
        },
    )


def _finite_rows(cache: FeatureCache, part: str, feats: Tensor, names: list[str]) -> Tensor:
    """`feats` when every row is finite; else an error naming the cache and the first bad items.

    `csalign encode` never stores NaN or Inf, so such rows mean the shards were written by something else
    (or with checksums recomputed after an edit); which cache, and which items, is what the user needs.
    """
    bad = (~torch.isfinite(feats)).any(dim=-1).nonzero().flatten().tolist() if feats.numel() else []
    if bad:
        shown = ", ".join(f"row {r} ({names[r]})" for r in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(
            f"{cache.directory}: {len(bad)} of {feats.shape[0]} {part} feature vectors hold NaN or Inf: {shown}; "
            f"re-encode the cache (`csalign encode ... --overwrite --out {cache.directory}`)"
        )
    return feats


def load_class_features(
    image_cache_dir: str | Path | FeatureCache, *, dtype: torch.dtype | None = torch.float32, verify: bool = True
) -> tuple[Tensor, Tensor, list[str]]:
    """Image features of a class-folder set.

    Args:
        image_cache_dir: the cache folder, or the cache already opened (then `verify` does not apply).
        dtype: cast features to this dtype (None keeps the stored fp16/fp32).
        verify: check per-shard sha256 checksums while opening.

    Returns:
        features (N, D), labels (N,) int64 class indices, class_names (index -> name). Images
        skipped as unreadable at encoding time are absent (listed in the cache's cache.json).
    """
    cache = as_cache(image_cache_dir, verify=verify)
    m = cache.manifest
    if not m.labels:
        raise ValueError(
            f"{cache.directory} was encoded from {cache.state.get('source')!r}, which has no class labels; "
            "encode a class-folder set (e.g. flowers:train)"
        )
    rows = cache.rows("image")
    if cache.skipped_images:
        warnings.warn(f"{len(cache.skipped_images)} unreadable images were skipped at encoding", stacklevel=2)
    feats = _finite_rows(cache, "image", cache.pooled("image", dtype), [m.image_ids[r] for r in rows])
    labels = torch.tensor([m.labels[r] for r in rows], dtype=torch.long)
    return feats, labels, list(m.class_names)
