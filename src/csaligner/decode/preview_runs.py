"""Retrieval preview straight from trained runs: prompts -> text adapter, cached images -> image adapter.

This is what `csalign preview --run NAME=DIR --image-cache DIR --prompts FILE` and the Flickr8k demo
call; `render_preview` draws the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.decode.preview import render_preview, retrieve_topk


def cached_images(image_cache: str | Path) -> tuple[Tensor, list[Path]]:
    """(N, D) pooled features of an image cache and the image files they came from, in row order."""
    from csaligner.data.cache import FeatureCache

    cache = FeatureCache.open(image_cache)
    rows = cache.rows("image")
    paths = cache.manifest.image_paths
    return cache.pooled("image", torch.float32), [Path(paths[r]) for r in rows]


def encode_prompts(prompts: list[str], text_encoder: str) -> Tensor:
    """(P, D) pooled prompt features from a registered text encoder (the one the runs were trained on)."""
    from csaligner.encoders import get_encoder

    with torch.inference_mode():
        return get_encoder(text_encoder).encode_texts(prompts).pooled.float()


def run_text_encoder(run_dir: str | Path) -> str:
    """The text encoder a run was trained on, read from its training text cache."""
    import yaml

    from csaligner.eval.evaluate import text_encoder_name

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
) -> tuple[Path, Path]:
    """Top-k images per prompt under each run's adapters, side by side (PNG grid + HTML page).

    Args:
        runs: display name -> training run folder.
        image_features: (N, D_img) frozen image features (e.g. from `cached_images`).
        image_paths: the N image files.
        prompts: P prompt strings.
        out_dir: where preview.png and preview.html go.
        k: images per prompt.
        prompt_features: (P, D_txt) frozen text features; encoded with the first run's text encoder when None.
        ground_truth: optional prompt index -> correct image rows (green border).
    """
    from csaligner.train.embed import apply_adapter
    from csaligner.train.model import load_adapters

    if not runs:
        raise ValueError("preview needs at least one run (--run NAME=DIR)")
    if prompt_features is None:
        prompt_features = encode_prompts(prompts, run_text_encoder(next(iter(runs.values()))))
    settings, scores = {}, {}
    for name, run in runs.items():
        adapters = load_adapters(str(run), "cpu")
        image_emb = F.normalize(apply_adapter(adapters.image, image_features), dim=-1)
        text_emb = F.normalize(apply_adapter(adapters.text, prompt_features), dim=-1)
        scores[name], settings[name] = retrieve_topk(text_emb, image_emb, k)
    return render_preview(prompts, settings, image_paths, out_dir, scores=scores, ground_truth=ground_truth)
