"""Tiny on-disk data made per test: a few small JPEGs, captions, class folders; no shared data needed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from csaligner.data.manifest import ImageTextManifest

WORDS = ("a", "dog", "cat", "runs", "jumps", "on", "the", "grass", "beach", "red", "blue", "ball")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_captions_tsv() -> Path:
    """The real Flickr8k captions.tsv under $CSALIGN_DATA (skips the test where the shared data is absent)."""
    from csaligner.data.datasets import data_root

    try:
        tsv = data_root() / "flickr8k" / "captions.tsv"
    except FileNotFoundError as err:
        pytest.skip(f"shared data not available: {err}")
    if not tsv.is_file():
        pytest.skip(f"{tsv} not found (set CSALIGN_DATA)")
    return tsv


def write_jpegs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 30)) -> list[Path]:
    """n random-colour JPEGs (non-square, so resize + centre crop run)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def make_manifest(folder: Path, n_images: int = 7, per_image: int = 2, unpaired_texts: int = 1) -> ImageTextManifest:
    """n_images JPEGs with `per_image` captions each plus a few unpaired captions."""
    paths = write_jpegs(folder, n_images)
    rng = random.Random(1)
    captions, t2i = [], []
    for i in range(n_images):
        for _ in range(per_image):
            captions.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))))
            t2i.append(i)
    for k in range(unpaired_texts):
        captions.append(f"an unpaired caption number {k}")
        t2i.append(-1)
    return ImageTextManifest(
        image_ids=tuple(p.name for p in paths),
        image_paths=tuple(str(p) for p in paths),
        captions=tuple(captions),
        text_to_image=tuple(t2i),
        caption_ids=tuple(f"c{j}" for j in range(len(captions))),
        name="tiny",
    )


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> ImageTextManifest:
    return make_manifest(tmp_path / "images")


@pytest.fixture
def class_root(tmp_path: Path) -> Path:
    """root/<class>/*.jpg with 3 classes of 3, 2, 4 images."""
    root = tmp_path / "classes"
    for seed, (name, n) in enumerate([("tulips", 3), ("daisy", 2), ("roses", 4)]):
        write_jpegs(root / name, n, seed=seed)
    return root
