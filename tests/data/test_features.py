"""PairedFeatures helpers."""

from __future__ import annotations

import torch

from csaligner.data.features import PairedFeatures


def test_first_captions_picks_the_lowest_row_and_marks_captionless_images() -> None:
    t2i = torch.tensor([2, 0, -1, 2, 0, 1])
    feats = PairedFeatures(image=torch.randn(4, 3), text=torch.randn(6, 3), text_to_image=t2i, image_ids=list("abcd"))
    assert feats.first_captions().tolist() == [1, 5, 0, -1]
