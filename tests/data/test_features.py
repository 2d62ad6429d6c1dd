"""PairedFeatures helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csaligner.data.features import PairedFeatures


def test_first_captions_picks_the_lowest_row_and_marks_captionless_images() -> None:
    t2i = torch.tensor([2, 0, -1, 2, 0, 1])
    feats = PairedFeatures(image=torch.randn(4, 3), text=torch.randn(6, 3), text_to_image=t2i, image_ids=list("abcd"))
    assert feats.first_captions().tolist() == [1, 5, 0, -1]


def feats_of(n: int = 4) -> PairedFeatures:
    t2i = torch.arange(2 * n) % n  # two captions per image
    ids = list("abcd"[:n])
    return PairedFeatures(image=torch.randn(n, 3), text=torch.randn(2 * n, 3), text_to_image=t2i, image_ids=ids)


def test_select_images_takes_a_list_an_array_or_a_boolean_mask() -> None:
    """A boolean mask was read as the rows 0 and 1 (True, False -> 1, 0); a list was an AttributeError."""
    feats = feats_of()
    ref = feats.select_images(torch.tensor([2, 0]))
    assert ref.image_ids == ["c", "a"] and ref.text_to_image.tolist() == [1, 0, 1, 0]
    for rows in ([2, 0], np.array([2, 0])):
        got = feats.select_images(rows)  # type: ignore[arg-type]
        assert got.image_ids == ref.image_ids and torch.equal(got.text, ref.text)
    masked = feats.select_images(torch.tensor([True, False, True, False]))
    assert masked.image_ids == ["a", "c"] and torch.equal(masked.image, feats.image[[0, 2]])


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (torch.tensor([1, 1]), r"rows repeats 1 image\(s\) \(e.g. row 1\).*without replacement"),
        (torch.tensor([0.5]), "1-D tensor of integer image rows.*got dtype torch.float32"),
        (torch.tensor([4]), r"rows must lie in \[0, 3\] \(the image rows\), got \[4, 4\]"),
        (torch.tensor([-1]), r"rows must lie in \[0, 3\]"),
        (torch.tensor([True, False]), r"boolean mask of images must have shape \(4,\)"),
    ],
)
def test_select_images_refuses_rows_it_would_misread(rows: torch.Tensor, match: str) -> None:
    """A repeated row kept 2 images but pointed every caption at one, a float 0.5 became row 0, -1 the last."""
    with pytest.raises(ValueError, match=match):
        feats_of().select_images(rows)
