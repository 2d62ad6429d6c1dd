"""Retrieval preview straight from trained runs: prompts -> text adapter, cached images -> image adapter.

This is what `csalign preview --run NAME=DIR --image-cache DIR --prompts FILE` and the Flickr8k demo
call; `render_preview` draws the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.decode.preview import render_preview, retrieve_topk

if TYPE_CHECKING:
    from csaligner.encoders import EncoderOutput


def cached_images(image_cache: str | Path) -> tuple[Tensor, list[Path]]:
    """(N, D) pooled features of an image cache and the image files they came from, in row order."""
    from csaligner.data.cache import FeatureCache

    cache = FeatureCache.open(image_cache)
    rows = cache.rows("image")
    paths = cache.manifest.image_paths
    return cache.pooled("image", torch.float32), [Path(paths[r]) for r in rows]


def cached_image_names(image_cache: str | Path) -> dict[str, int]:
    """Each image of a cache by its image id and by its file path -> its row in `cached_images` order."""
    from csaligner.data.cache import FeatureCache

    cache = FeatureCache.open(image_cache, verify=False)
    manifest = cache.manifest
    names = {}
    for i, r in enumerate(cache.rows("image")):
        names[manifest.image_paths[r]] = names[manifest.image_ids[r]] = i
    return names


def encode_prompts(prompts: list[str], text_encoder: str, *, tokens: bool = False) -> EncoderOutput:
    """Prompt features from a registered text encoder (the one the runs were trained on).

    Returns:
        float32 pooled (P, D) and, with `tokens`, token states (P, L, D_tok) and their (P, L) mask.
    """
    from csaligner.train.embed import encode_texts

    return encode_texts(prompts, text_encoder, tokens=tokens)


def run_text_encoder(run_dir: str | Path) -> str:
    """The text encoder a run was trained on: from its record (`encoders.json`), else from its training
    text cache (runs from before the record; that path is relative to where the run was trained)."""
    import yaml

    from csaligner.eval.evaluate import text_encoder_name
    from csaligner.train.model import run_encoders

    recorded = run_encoders(str(run_dir)).get("text_encoder")
    if recorded:
        return recorded.split("@", 1)[0]
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return text_encoder_name(config["data"]["text_cache"])


def preview_runs(
    runs: Mapping[str, str | Path],
    image_features: Tensor,
    image_paths: list[Path],
    prompts: list[str],
    out_dir: str | Path,
    k: int = 5,
    prompt_features: Tensor | None = None,
    ground_truth: Mapping[int, set[int]] | None = None,
    *,
    prompt_tokens: Tensor | None = None,
    prompt_token_mask: Tensor | None = None,
    thumb_size: int = 128,
) -> tuple[Path, Path]:
    """Top-k images per prompt under each run's adapters, side by side (PNG grid + HTML page).

    Args:
        runs: display name -> training run folder.
        image_features: (N, D_img) frozen image features (e.g. from `cached_images`).
        image_paths: the N image files.
        prompts: P prompt strings.
        out_dir: where preview.png and preview.html go.
        k: images per prompt.
        prompt_features: see `rank_runs`.
        ground_truth: optional prompt index -> correct image rows (green border).
        prompt_tokens: see `rank_runs`.
        prompt_token_mask: see `rank_runs`.
        thumb_size: thumbnail side in pixels.
    """
    scores, settings = rank_runs(
        runs,
        image_features,
        prompts,
        k,
        prompt_features,
        prompt_tokens=prompt_tokens,
        prompt_token_mask=prompt_token_mask,
    )
    return render_preview(
        prompts, settings, image_paths, out_dir, scores=scores, ground_truth=ground_truth, thumb_size=thumb_size
    )


def rank_runs(
    runs: Mapping[str, str | Path],
    image_features: Tensor,
    prompts: list[str],
    k: int = 5,
    prompt_features: Tensor | None = None,
    *,
    prompt_tokens: Tensor | None = None,
    prompt_token_mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each run's top-k images per prompt: ({name: (P, k) scores}, {name: (P, k) image rows}).

    Args:
        runs: display name -> training run folder.
        image_features: (N, D_img) frozen image features.
        prompts: P prompt strings.
        k: images per prompt.
        prompt_features: (P, D_txt) frozen text features; when None the prompts are encoded with the
            first run's text encoder, with token states if any run's text adapter reads them.
        prompt_tokens: (P, L, D_tok) token states of `prompt_features`, needed by runs whose text
            adapter reads tokens (data.use_tokens=true with a prior text adapter).
        prompt_token_mask: (P, L) bool mask of `prompt_tokens`.

    Raises:
        ValueError: a run's text adapter reads tokens and `prompt_features` came without `prompt_tokens`.
    """
    from csaligner.train.embed import apply_adapter, apply_text_adapter, text_adapter_reads_tokens
    from csaligner.train.model import load_adapters

    if not runs:
        raise ValueError("preview needs at least one run (--run NAME=DIR)")
    loaded = {name: load_adapters(str(run), "cpu") for name, run in runs.items()}
    fix = "pass prompt_tokens (and prompt_token_mask) with prompt_features, or leave prompt_features out"
    if prompt_features is None:
        encoder = run_text_encoder(next(iter(runs.values())))
        need = any(text_adapter_reads_tokens(a) for a in loaded.values())
        encoded = encode_prompts(prompts, encoder, tokens=need)
        prompt_features, prompt_tokens, prompt_token_mask = encoded.pooled, encoded.tokens, encoded.mask
    settings, scores = {}, {}
    for name, adapters in loaded.items():
        image_emb = F.normalize(apply_adapter(adapters.image, image_features), dim=-1)
        text = apply_text_adapter(adapters, runs[name], prompt_features, prompt_tokens, prompt_token_mask, fix=fix)
        scores[name], settings[name] = retrieve_topk(F.normalize(text, dim=-1), image_emb, k)
    return scores, settings
