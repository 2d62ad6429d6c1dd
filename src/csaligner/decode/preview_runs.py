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
from csaligner.encoders.base import EncoderOutput

if TYPE_CHECKING:
    from csaligner.data.cache import FeatureCache


def cached_images(image_cache: str | Path | FeatureCache) -> tuple[Tensor, list[Path]]:
    """(N, D) pooled features of an image cache and the image files they came from, in row order.

    A folder is opened with every shard's checksum verified; an opened cache is used as it is.
    """
    from csaligner.data.cache import as_cache

    cache = as_cache(image_cache)
    rows = cache.rows("image")
    paths = cache.manifest.image_paths
    return cache.pooled("image", torch.float32), [Path(paths[r]) for r in rows]


def cached_image_names(image_cache: str | Path | FeatureCache) -> dict[str, int]:
    """Each image of a cache (a folder, or one opened) by its image id and by its file path -> its row in
    `cached_images` order."""
    from csaligner.data.cache import as_cache

    cache = as_cache(image_cache, verify=False)
    manifest = cache.manifest
    names = {}
    for i, r in enumerate(cache.rows("image")):
        names[manifest.image_paths[r]] = names[manifest.image_ids[r]] = i
    return names


def encode_prompts(
    prompts: list[str], text_encoder: str, *, tokens: bool = False, expect_id: str | None = None
) -> EncoderOutput:
    """Prompt features from a registered text encoder (the one the runs were trained on; `expect_id`, the
    id the run recorded, makes sure it still loads the same weights).

    Returns:
        float32 pooled (P, D) and, with `tokens`, token states (P, L, D_tok) and their (P, L) mask.
    """
    from csaligner.train.embed import encode_texts

    return encode_texts(prompts, text_encoder, tokens=tokens, expect_id=expect_id)


def run_text_encoder(run_dir: str | Path) -> str:
    """How to load the text encoder a run was trained on (a `get_encoder` name): from its record
    (`encoders.json`: the spec, else the name in the id), else from its training text cache (runs from
    before the record; that path is relative to where the run was trained)."""
    from csaligner.encoders.base import encoder_name
    from csaligner.eval.evaluate import cache_encoder_spec
    from csaligner.train.model import run_encoders
    from csaligner.train.overrides import read_yaml

    recorded = run_encoders(str(run_dir))
    if recorded.get("text_encoder_spec"):
        return recorded["text_encoder_spec"]
    if recorded.get("text_encoder"):
        return encoder_name(recorded["text_encoder"])
    config = read_yaml(Path(run_dir) / "config.yaml")
    return cache_encoder_spec(config["data"]["text_cache"])


def run_text_encoder_id(run_dir: str | Path) -> str | None:
    """The id of the text encoder a run recorded (None for runs from before the record)."""
    from csaligner.train.model import run_encoders

    return run_encoders(str(run_dir)).get("text_encoder")


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
        prompt_features: (P, D_txt) frozen text features of the encoder every run was trained on; when
            None the prompts are encoded for each run with its own text encoder (`run_text_encoder`;
            once per distinct encoder), with token states where a run's text adapter reads them.
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
        per_run = prompts_per_run(runs, prompts, {name: text_adapter_reads_tokens(a) for name, a in loaded.items()})
    else:
        given = EncoderOutput(prompt_features, prompt_tokens, prompt_token_mask)
        per_run = dict.fromkeys(runs, given)
    settings, scores = {}, {}
    for name, adapters in loaded.items():
        image_emb = F.normalize(apply_adapter(adapters.image, image_features), dim=-1)
        p = per_run[name]
        text = apply_text_adapter(adapters, runs[name], p.pooled, p.tokens, p.mask, fix=fix)
        scores[name], settings[name] = retrieve_topk(F.normalize(text, dim=-1), image_emb, k)
    return scores, settings


def prompts_per_run(
    runs: Mapping[str, str | Path], prompts: list[str], needs_tokens: Mapping[str, bool]
) -> dict[str, EncoderOutput]:
    """Each run's prompt features from the text encoder it was trained on, encoded once per distinct encoder.

    Runs trained on different text encoders (even of one width) need different features: features from
    another encoder fit the adapters but rank nonsense.

    Args:
        runs: display name -> training run folder.
        prompts: P prompt strings.
        needs_tokens: display name -> whether the run's text adapter reads token states.

    Returns:
        display name -> float32 pooled (P, D_txt), with tokens (P, L, D_tok) and mask where any run
        sharing that encoder needs them.
    """
    encoders = {name: (run_text_encoder(run), run_text_encoder_id(run)) for name, run in runs.items()}
    per_run: dict[str, EncoderOutput] = {}
    for spec, expect_id in dict.fromkeys(encoders.values()):  # first-seen order
        users = [name for name, e in encoders.items() if e == (spec, expect_id)]
        tokens = any(needs_tokens[name] for name in users)
        encoded = encode_prompts(prompts, spec, tokens=tokens, expect_id=expect_id)
        per_run.update(dict.fromkeys(users, encoded))
    return per_run
