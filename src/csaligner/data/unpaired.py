"""Unpaired pools: image-only and text-only sets, and a paired/unpaired split for the paper's experiments.

An unpaired pool is an `ImageTextManifest` whose captions all have text_to_image = -1. Its images
and captions come from disjoint sources (or are shuffled independently), so no pairing can be
recovered from row order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from csaligner.data.manifest import ImageTextManifest


def image_pool(paths: Sequence[str | Path], ids: Sequence[str] | None = None, name: str = "") -> ImageTextManifest:
    """Images without captions (ids default to the paths)."""
    strs = [str(p) for p in paths]
    return ImageTextManifest(image_ids=tuple(ids or strs), image_paths=tuple(strs), name=name)


def text_pool(captions: Sequence[str], name: str = "") -> ImageTextManifest:
    """Captions without images."""
    if isinstance(captions, str):
        raise TypeError("text_pool takes a list of captions, got one str")
    return ImageTextManifest(
        image_ids=(), image_paths=(), captions=tuple(captions), text_to_image=(-1,) * len(captions), name=name
    )


def split_paired_unpaired(
    manifest: ImageTextManifest, paired_fraction: float, seed: int = 0
) -> tuple[ImageTextManifest, ImageTextManifest]:
    """Keep a random `paired_fraction` of the images (with their captions) paired; unpair the rest.

    The unpaired part holds the remaining images and all their captions, with images and captions
    shuffled independently and every link removed (text_to_image = -1).

    Args:
        manifest: a paired manifest.
        paired_fraction: share of images kept paired, in [0, 1]; rounded to whole images.
        seed: shuffling seed; the same seed gives the same split.

    Returns:
        (paired, unpaired) manifests; their images and captions partition the input's paired items.
    """
    if not 0.0 <= paired_fraction <= 1.0:
        raise ValueError(f"paired_fraction must lie in [0, 1], got {paired_fraction}")
    if manifest.num_images == 0 or manifest.num_texts == 0:
        raise ValueError("split_paired_unpaired needs a manifest with both images and captions")
    rng = random.Random(seed)
    order = list(range(manifest.num_images))
    rng.shuffle(order)
    n_paired = round(paired_fraction * manifest.num_images)
    paired_rows = sorted(order[:n_paired])
    rest_rows = order[n_paired:]  # already in shuffled order
    paired = manifest.select_images(paired_rows, name=f"{manifest.name}:paired{paired_fraction:g}@{seed}")
    rest = manifest.select_images(rest_rows)
    texts = list(range(rest.num_texts))
    rng.shuffle(texts)
    unpaired = ImageTextManifest(
        image_ids=rest.image_ids,
        image_paths=rest.image_paths,
        captions=tuple(rest.captions[j] for j in texts),
        text_to_image=(-1,) * len(texts),
        caption_ids=tuple(rest.caption_ids[j] for j in texts) if rest.caption_ids else (),
        labels=rest.labels,
        class_names=rest.class_names,
        name=f"{manifest.name}:unpaired{1 - paired_fraction:g}@{seed}",
    )
    return paired, unpaired


def concat_manifests(*parts: ImageTextManifest, name: str = "") -> ImageTextManifest:
    """One manifest from several (e.g. paired + unpaired), links re-indexed; image ids must stay unique."""
    ids: list[str] = []
    paths: list[str] = []
    caps: list[str] = []
    t2i: list[int] = []
    cap_ids: list[str] = []
    with_ids = all(p.caption_ids or not p.captions for p in parts)
    for p in parts:
        if p.labels:
            raise ValueError("concat_manifests does not merge class labels; concatenate classification sets yourself")
        offset = len(ids)
        ids += p.image_ids
        paths += p.image_paths
        caps += p.captions
        t2i += [t + offset if t >= 0 else -1 for t in p.text_to_image]
        cap_ids += p.caption_ids if with_ids else ()
    return ImageTextManifest(
        image_ids=tuple(ids),
        image_paths=tuple(paths),
        captions=tuple(caps),
        text_to_image=tuple(t2i),
        caption_ids=tuple(cap_ids),
        name=name or "+".join(p.name for p in parts),
    )
