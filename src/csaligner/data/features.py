"""`PairedFeatures`: the in-memory hand-off between the feature cache and training/evaluation.

The cache (csaligner.data.cache) produces it; train/ and eval/ consume it. Images and texts are
stored once each; `text_to_image` links every caption to its image row, so several captions per
image and unpaired pools need no duplication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csaligner._validation import check_features


@dataclass
class PairedFeatures:
    """Frozen-encoder features of an image-text set.

    Attributes:
        image: (N, D_img) pooled image features.
        text: (M, D_txt) pooled text features.
        text_to_image: (M,) int64 image row of each text; -1 marks an unpaired text.
        image_ids: N image identifiers (file names), in row order.
        captions: M caption strings, in row order (may be empty when unknown).
        image_tokens: optional (N, V, D_img) token features (e.g. spatial feature-map cells).
        image_token_mask: optional (N, V) bool.
        text_tokens: optional (M, L, D_txt) token features.
        text_token_mask: optional (M, L) bool.
        meta: free-form provenance (encoder ids, cache keys).
    """

    image: Tensor
    text: Tensor
    text_to_image: Tensor
    image_ids: list[str]
    captions: list[str] = field(default_factory=list)
    image_tokens: Tensor | None = None
    image_token_mask: Tensor | None = None
    text_tokens: Tensor | None = None
    text_token_mask: Tensor | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_features("image", self.image)
        check_features("text", self.text)
        n, m = self.image.shape[0], self.text.shape[0]
        if self.text_to_image.shape != (m,):
            raise ValueError(f"text_to_image must have shape ({m},), got {tuple(self.text_to_image.shape)}")
        if int(self.text_to_image.max()) >= n or int(self.text_to_image.min()) < -1:
            raise ValueError(f"text_to_image values must lie in [-1, {n - 1}]")
        if len(self.image_ids) != n:
            raise ValueError(f"{len(self.image_ids)} image_ids for {n} image rows")
        if self.captions and len(self.captions) != m:
            raise ValueError(f"{len(self.captions)} captions for {m} text rows")

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.text.shape[0])

    def first_captions(self) -> Tensor:
        """(N,) row of each image's first caption (lowest text row), -1 for an image without one."""
        t2i = self.text_to_image
        paired = t2i >= 0
        first = torch.full((self.num_images,), self.num_texts, dtype=torch.long)
        first.scatter_reduce_(0, t2i[paired], paired.nonzero().flatten(), "amin")
        return torch.where(first < self.num_texts, first, -1)

    def select_images(self, rows: Tensor | Sequence[int]) -> PairedFeatures:
        """Keep the given image rows (in that order) and the captions that point at them (re-indexed).

        Args:
            rows: (K,) distinct image rows in [0, N) (a tensor, list or array), or an (N,) boolean mask.

        Returns:
            PairedFeatures of the K images; unpaired captions (-1) are dropped.
        """
        rows = _image_rows(rows, self.num_images)
        remap = torch.full((self.num_images,), -1, dtype=torch.long)
        remap[rows] = torch.arange(rows.numel())
        keep = (self.text_to_image >= 0) & (remap[self.text_to_image.clamp_min(0)] >= 0)
        tk = keep.nonzero().flatten()
        return PairedFeatures(
            image=self.image[rows],
            text=self.text[tk],
            text_to_image=remap[self.text_to_image[tk]],
            image_ids=[self.image_ids[i] for i in rows.tolist()],
            captions=[self.captions[i] for i in tk.tolist()] if self.captions else [],
            image_tokens=None if self.image_tokens is None else self.image_tokens[rows],
            image_token_mask=None if self.image_token_mask is None else self.image_token_mask[rows],
            text_tokens=None if self.text_tokens is None else self.text_tokens[tk],
            text_token_mask=None if self.text_token_mask is None else self.text_token_mask[tk],
            meta=dict(self.meta),
        )


def _image_rows(rows: Tensor | Sequence[int], n: int) -> Tensor:
    """(K,) int64 rows from `select_images`' argument, checked: a boolean mask was read as rows 0 and 1, 0.5 as
    row 0, and a repeated row left all its captions on one copy and the others without a caption."""
    r = rows if isinstance(rows, Tensor) else torch.as_tensor(rows)
    if r.dtype == torch.bool:
        if r.shape != (n,):
            raise ValueError(
                f"a boolean mask of images must have shape ({n},), one flag per image, got {tuple(r.shape)}"
            )
        return r.nonzero().flatten()
    if r.numel() == 0:
        return r.reshape(0).long()  # torch.as_tensor([]) is float32; PairedFeatures refuses no image itself
    if r.dim() != 1 or r.is_floating_point() or r.is_complex():
        raise ValueError(
            f"rows must be a 1-D tensor of integer image rows or an ({n},) boolean mask, "
            f"got dtype {r.dtype} and shape {tuple(r.shape)}"
        )
    r = r.long()
    lo, hi = int(r.min()), int(r.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"rows must lie in [0, {n - 1}] (the image rows), got [{lo}, {hi}]")
    if r.unique().numel() != r.numel():
        values, counts = r.unique(return_counts=True)
        raise ValueError(
            f"rows repeats {int((counts > 1).sum())} image(s) (e.g. row {int(values[counts > 1][0])}); each image can "
            "be kept once (its captions would all point at one copy): draw rows without replacement, e.g. "
            "torch.randperm(num_images)[:k]"
        )
    return r
