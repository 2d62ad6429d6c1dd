"""Image-text retrieval recall (R@K) with several captions per image, chunked over queries.

Protocol (Flickr30k / COCO Karpathy test): an image query is correct at K if ANY of its captions
is among the top K texts; a text query is correct at K if its one image is among the top K
images. Scores are cosine similarities (features are L2-normalised here).

Ranks and ties: the rank of a query is the number of *negatives* placed before its best positive.
With ``ties="pessimistic"`` (default) a negative scoring exactly as high as the positive counts
as placed before it, so a collapsed model (all scores equal) gets R@K = 0 for every K up to the
number of negatives instead of 100% (a random tie-break would give about K / gallery size);
``ties="optimistic"`` counts only strictly greater scores. Other captions of the same
image never push a positive down.

Recall values are percentages (0-100), as in the paper's tables; "rsum" is their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import check_features, check_same_dim
from csaligner.eval._common import check_chunk_size, check_index, check_ks, compute_dtype, unit_rows

TieRule = Literal["pessimistic", "optimistic"]


def recall_at_k(ranks: Tensor, k: int) -> float:
    """Percentage of queries whose rank (negatives ahead of the best positive) is below k."""
    if ranks.numel() == 0:
        raise ValueError("recall_at_k needs at least one query rank")
    return 100.0 * float((ranks < k).double().mean())


def _check_ties(ties: str) -> None:
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f'ties must be "pessimistic" or "optimistic", got {ties!r}')


def _ahead(scores: Tensor, best: Tensor, negatives: Tensor, ties: TieRule) -> Tensor:
    """(c, G) scores, (c,) best positive score, (c, G) negative mask -> (c,) negatives ranked ahead."""
    before = scores >= best.unsqueeze(1) if ties == "pessimistic" else scores > best.unsqueeze(1)
    return (before & negatives).sum(1)


def image_query_ranks(image: Tensor, text: Tensor, text_to_image: Tensor, chunk_size: int, ties: TieRule) -> Tensor:
    """Rank of each captioned image query among the texts.

    Args:
        image: (N, D) unit-norm image features.
        text: (M, D) unit-norm text features.
        text_to_image: (M,) int64 image row of each text, -1 for a caption-less distractor.
        chunk_size: image queries per (chunk, M) score block.
        ties: tie rule, see the module docstring.

    Returns:
        (N',) int64 ranks of the N' images that have at least one caption, in image order.
    """
    ranks = []
    for start in range(0, image.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, image.shape[0]), device=image.device)
        scores = image[rows] @ text.T  # (c, M) cosine similarities
        positive = text_to_image.unsqueeze(0) == rows.unsqueeze(1)  # (c, M) captions of each image
        best = scores.masked_fill(~positive, float("-inf")).amax(1)  # (c,) best caption score
        has_caption = positive.any(1)
        ranks.append(_ahead(scores, best, ~positive, ties)[has_caption])
    return torch.cat(ranks)


def text_query_ranks(text: Tensor, image: Tensor, text_to_image: Tensor, chunk_size: int, ties: TieRule) -> Tensor:
    """Rank of each paired text query among the images.

    Args:
        text: (M, D) unit-norm text (or mapped-text) features.
        image: (N, D) unit-norm image features.
        text_to_image: (M,) int64 image row of each text; -1 texts are skipped.
        chunk_size: text queries per (chunk, N) score block.
        ties: tie rule, see the module docstring.

    Returns:
        (M',) int64 ranks of the M' texts with an image, in text order.
    """
    ranks = []
    for start in range(0, text.shape[0], chunk_size):
        target = text_to_image[start : start + chunk_size]
        paired = target >= 0
        scores = text[start : start + chunk_size] @ image.T  # (c, N)
        best = scores.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)  # (c,) score of the true image
        negative = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target.clamp_min(0).unsqueeze(1), False)
        ranks.append(_ahead(scores, best, negative, ties)[paired])
    return torch.cat(ranks)


@autocast_off
def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    *,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Image-to-text and text-to-image recall at each K (multi-caption protocol).

    Memory stays at one (chunk_size, M) or (chunk_size, N) score block, so 5k images x 25k
    captions fits anywhere; results do not depend on chunk_size.

    Args:
        image_emb: (N, D) image embeddings (any scale; normalised here).
        text_emb: (M, D) text embeddings in the same space.
        text_to_image: (M,) integer image row of each text. -1 marks a text with no image: it stays
            in the gallery as a distractor for image queries but is not a query itself. Images
            without any caption are skipped as image queries (they remain text-query distractors).
        ks: recall cut-offs.
        chunk_size: queries scored per block.
        ties: "pessimistic" (default; equal scores count against the query) or "optimistic".

    Returns:
        {"i2t_R@1": ..., "i2t_R@5": ..., "i2t_R@10": ..., "t2i_R@1": ..., ..., "rsum": ...} in
        percent; "rsum" is the sum of all the recall values.
    """
    check_features("image_emb", image_emb)
    check_features("text_emb", text_emb)
    check_same_dim("image_emb", image_emb, "text_emb", text_emb)
    ks = check_ks(ks)
    chunk_size = check_chunk_size(chunk_size)
    _check_ties(ties)
    dtype = compute_dtype(image_emb, text_emb)
    image = unit_rows(image_emb, dtype)
    text = unit_rows(text_emb.to(image.device), dtype)
    t2i = check_index("text_to_image", text_to_image, text.shape[0], image.shape[0], device=image.device)
    if not bool((t2i >= 0).any()):
        raise ValueError("text_to_image marks every text as unpaired (-1); retrieval needs at least one pair")
    ranks = {
        "i2t": image_query_ranks(image, text, t2i, chunk_size, ties),
        "t2i": text_query_ranks(text, image, t2i, chunk_size, ties),
    }
    out = {f"{direction}_R@{k}": recall_at_k(r, k) for direction, r in ranks.items() for k in ks}
    out["rsum"] = sum(out.values())
    return out
