"""split_paired_unpaired: a partition of the items, links kept or removed, deterministic per seed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from csaligner.data import ImageTextManifest, concat_manifests, split_paired_unpaired

from .conftest import make_manifest


@pytest.fixture
def big(tmp_path: Path) -> ImageTextManifest:
    return make_manifest(tmp_path / "imgs", n_images=20, per_image=5, unpaired_texts=0)


def pairs(m: ImageTextManifest) -> Counter:
    return Counter((m.image_ids[t], c) for c, t in zip(m.captions, m.text_to_image, strict=True) if t >= 0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_split_is_a_partition(big: ImageTextManifest, fraction: float) -> None:
    paired, unpaired = split_paired_unpaired(big, fraction, seed=3)
    assert paired.num_images == round(20 * fraction)
    assert sorted(paired.image_ids + unpaired.image_ids) == sorted(big.image_ids)
    assert Counter(paired.captions + unpaired.captions) == Counter(big.captions)
    # Paired part: every link is an original (image, caption) pair, all of that image's captions kept.
    assert pairs(paired) == Counter({k: v for k, v in pairs(big).items() if k[0] in paired.image_ids})
    assert set(unpaired.text_to_image) <= {-1}


def test_unpaired_part_is_shuffled_independently(big: ImageTextManifest) -> None:
    _, unpaired = split_paired_unpaired(big, 0.0, seed=0)
    # Reading the pools in order must not recover the pairing: in the input, 80 of 99 neighbouring
    # captions share an image; after an independent shuffle only about 4 do.
    source = {c: big.text_to_image[j] for j, c in enumerate(big.captions)}
    same = sum(source[a] == source[b] for a, b in zip(unpaired.captions, unpaired.captions[1:], strict=False))
    assert same < 20
    assert list(unpaired.image_ids) != list(big.image_ids)


def test_split_is_deterministic_per_seed(big: ImageTextManifest) -> None:
    a = split_paired_unpaired(big, 0.5, seed=1)
    assert a == split_paired_unpaired(big, 0.5, seed=1)
    assert a[0].image_ids != split_paired_unpaired(big, 0.5, seed=2)[0].image_ids


def test_split_then_concat_gives_one_mixed_set(big: ImageTextManifest) -> None:
    paired, unpaired = split_paired_unpaired(big, 0.3, seed=0)
    mixed = concat_manifests(paired, unpaired)
    assert mixed.num_images == 20 and mixed.num_texts == 100
    assert sum(t >= 0 for t in mixed.text_to_image) == paired.num_texts
    assert pairs(mixed) == pairs(paired)


def test_split_arguments(big: ImageTextManifest) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        split_paired_unpaired(big, 1.5)
    with pytest.raises(ValueError, match="both images and captions"):
        split_paired_unpaired(big.select_images([]), 0.5)
