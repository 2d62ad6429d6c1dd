"""Symmetric CLIP InfoNCE, paired and multi-positive (several captions per image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import (
    check_features,
    check_positive,
    check_same_dim,
    check_tensor,
    checked_already,
    checks_finite_once,
    record_checked,
)


def check_text_to_image(
    text_to_image: Tensor, n_images: int, n_texts: int, device: torch.device | None = None
) -> Tensor:
    """Validate a (M,) caption -> image index map (any integer dtype) and return it as int64 (on `device`
    when given); every image needs at least one caption."""
    check_tensor("text_to_image", text_to_image, "image row indices")
    if device is not None:
        text_to_image = text_to_image.to(device)
    if text_to_image.shape != (n_texts,):
        raise ValueError(
            f"text_to_image must have shape ({n_texts},) (one image index per text), got {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    t2i = text_to_image.long()  # cross_entropy takes int64 targets, not e.g. numpy's int32
    check = f"text_to_image of {n_images} images, {n_texts} texts"
    if checked_already(check, t2i):  # e.g. the loss module's map, handed on to the kernels
        return t2i
    counts = caption_counts(t2i, n_images)
    # One host read (a GPU sync) for the three tests; the messages' details are read only on failure.
    lo, hi, n_orphans = torch.stack([t2i.min(), t2i.max(), (counts == 0).sum()]).tolist()
    if lo < 0 or hi >= n_images:
        unpaired = (
            f"; {int((t2i < 0).sum())} caption(s) have no image (-1, as in PairedFeatures.text_to_image): "
            "pass them as unpaired_texts (text[text_to_image < 0]) so they enter only the CS term"
            if lo < 0
            else ""
        )
        raise ValueError(
            f"text_to_image values must lie in [0, {n_images - 1}] (the image rows), got [{lo}, {hi}]{unpaired}"
        )
    if n_orphans:
        orphans = (counts == 0).nonzero().flatten()
        raise ValueError(
            f"{n_orphans} image(s) have no caption in this batch (rows {orphans[:10].tolist()}); "
            "pass caption-less images as unpaired_images so they enter only the CS term"
        )
    record_checked(check, t2i)
    return t2i


def caption_counts(text_to_image: Tensor, n_images: int) -> Tensor:
    """(n_images,) int64 number of captions of each image row, from a (M,) int64 map, with no host read
    (`torch.bincount` reads its output size, a GPU sync). Values outside [0, n_images) are not counted."""
    ordered = torch.sort(text_to_image).values
    edges = torch.searchsorted(ordered, torch.arange(n_images + 1, device=ordered.device))  # (n_images + 1,) #(< k)
    return edges[1:] - edges[:-1]


@autocast_off
@checks_finite_once
def info_nce(
    x: Tensor,
    y: Tensor,
    temperature: float | Tensor = 0.07,
    text_to_image: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE on cosine similarity (CLIP), averaged over both directions.

    Paired form (text_to_image None): x (N, D) images and y (N, D) texts, row i matches row i.
    Multi-positive form: y (M, D) texts with text_to_image (M,) giving each text's image row. Text
    -> image is ordinary cross-entropy (one correct image per text); image -> text averages
    -log softmax over each image's captions (SupCon's "L_out"; equals CE for one caption).

    Args:
        x: (N, D) image features (normalised here).
        y: (M, D) text features (normalised here).
        temperature: softmax temperature > 0 (float or scalar tensor, e.g. learnable).
        text_to_image: optional (M,) int64 image index of each text.

    Returns:
        Scalar tensor (float32 for low-precision inputs).
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    check_positive("temperature", temperature)
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xn = F.normalize(x.to(dtype), dim=-1)
    yn = F.normalize(y.to(dtype), dim=-1)
    logits = xn @ yn.T / temperature  # (N, M) image-by-text
    if text_to_image is None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"paired InfoNCE needs as many texts as images, got {x.shape[0]} images and {y.shape[0]} texts; "
                "pass text_to_image for several captions per image"
            )
        target = torch.arange(x.shape[0], device=x.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    t2i = check_text_to_image(text_to_image, x.shape[0], y.shape[0], x.device)
    t2i_loss = F.cross_entropy(logits.T, t2i)
    positive = t2i.unsqueeze(0) == torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (N, M)
    log_prob = logits.log_softmax(dim=1)
    i2t_loss = -(log_prob * positive).sum(1).div(positive.sum(1)).mean()
    return 0.5 * (t2i_loss + i2t_loss)
