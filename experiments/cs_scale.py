"""Why lambda matters: the size of D_CS (and MMD, KL) and of its gradient next to InfoNCE's.

    PYTHONPATH=src python experiments/cs_scale.py --run runs/claims/runs/<InfoNCE key>/seed0

Embeds the Flickr8k train features with a trained run's adapters, draws batches of paired
(image, one caption) embeddings as the trainer does, and prints, per kernel width sigma, the batch
D_CS, its gradient norm with respect to the (unit-norm) embeddings, and the ratio to InfoNCE's
gradient norm: lambda has to be about 1 / ratio before D_CS moves the embeddings as much as InfoNCE.

With --token-cache IMG,TXT (caches encoded with --tokens) it also measures the token-level term:
per image, D_CS between its 49 feature-map cells and its first caption's word tokens, both mapped
token by token through the run's adapters, averaged over --token-images images of each batch.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.data import load_paired_features
from csaligner.data.features import PairedFeatures
from csaligner.losses import cs_divergence, gaussian_kl, info_nce, mmd, token_cs_divergence
from csaligner.train import embed
from csaligner.train.model import LoadedAdapters, load_adapters, tokenwise


def grad_norm(fn: Callable[[Tensor, Tensor], Tensor], image: Tensor, text: Tensor) -> tuple[float, float]:
    """(value, ||d value / d (image, text)||) of fn on leaf copies of the (B, D) embeddings."""
    x, y = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    value = fn(F.normalize(x, dim=-1), F.normalize(y, dim=-1))
    gx, gy = torch.autograd.grad(value, (x, y))
    return float(value.detach()), float(torch.cat([gx.flatten(), gy.flatten()]).norm())


def token_grad_norms(
    adapters: LoadedAdapters, feats: PairedFeatures, first_caption: Tensor, rows: Tensor, sigma: float
) -> tuple[float, float]:
    """(value, grad norm) of the token-level D_CS of `rows`' images and their first captions.

    The grad is taken with respect to the mapped (pre-normalisation) tokens, as `grad_norm` does for
    the pooled embeddings, so the two are comparable pulls on the adapter outputs.
    """
    assert feats.image_tokens is not None and feats.text_tokens is not None
    caps = first_caption[rows]
    with torch.no_grad():
        x = tokenwise(adapters.image, feats.image_tokens[rows].float())
        y = tokenwise(adapters.text, feats.text_tokens[caps].float())
    x.requires_grad_(True)
    y.requires_grad_(True)
    vm = None if feats.image_token_mask is None else feats.image_token_mask[rows]
    tm = None if feats.text_token_mask is None else feats.text_token_mask[caps]
    value = token_cs_divergence(F.normalize(x, dim=-1), F.normalize(y, dim=-1), vm, tm, sigma=sigma)
    gx, gy = torch.autograd.grad(value, (x, y))
    return float(value.detach()), float(torch.cat([gx.flatten(), gy.flatten()]).norm())


def measure(
    image: Tensor,
    text: Tensor,
    batches: int,
    batch_size: int,
    seed: int,
    tokens: Callable[[Tensor, float], tuple[float, float]] | None = None,
) -> list[str]:
    """Markdown table rows: one per divergence and sigma, mean over `batches` random batches.

    `tokens(rows, sigma)`, when given, adds token-level D_CS rows for the same batches.
    """
    gen = torch.Generator().manual_seed(seed)
    terms: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"InfoNCE (T=0.07)": info_nce}
    for s in (0.25, 0.5, 1.0, 2.0, 4.0):
        terms[f"D_CS σ={s:g}"] = functools.partial(cs_divergence, sigma=s)
    terms["MMD σ=1"] = lambda a, b: mmd(a, b, sigma=1.0)
    terms["KL (Gaussian)"] = gaussian_kl
    stats: dict[str, list[tuple[float, float]]] = {k: [] for k in terms}
    for _ in range(batches):
        rows = torch.randperm(image.shape[0], generator=gen)[:batch_size]
        for name, fn in terms.items():
            stats[name].append(grad_norm(fn, image[rows], text[rows]))
        if tokens is not None:
            for width in (0.5, 1.0, 2.0):
                stats.setdefault(f"token D_CS σ={width:g}", []).append(tokens(rows, width))
    ref = statistics.mean(g for _, g in stats["InfoNCE (T=0.07)"])
    lines = ["| term | batch value | grad norm | grad / InfoNCE grad |", "| --- | ---: | ---: | ---: |"]
    for name, values in stats.items():
        v, g = statistics.mean(v for v, _ in values), statistics.mean(g for _, g in values)
        lines.append(f"| {name} | {v:.4g} | {g:.3g} | {g / ref:.3g} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="trained run folder (image/text adapters)")
    p.add_argument("--cache", default="/work/cache")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--token-cache", default="", help="IMG,TXT token caches (in --cache) for the token-level rows")
    p.add_argument("--token-images", type=int, default=64, help="images of each batch in the token-level term")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    feats = load_paired_features(cache / "flickr8k-train-efficientnet-lite0", cache / "flickr8k-train-minilm")
    image, text = embed(feats, args.run)  # (6000, D), (30000, D), unit norm
    first_caption = feats.first_captions()  # every Flickr8k image has captions
    tokens = None
    if args.token_cache:
        img_dir, txt_dir = (cache / d for d in args.token_cache.split(","))
        tok_feats = load_paired_features(img_dir, txt_dir, dtype=None)  # fp16 tokens stay fp16 until used
        if tok_feats.image_ids != feats.image_ids:
            p.error("--token-cache must hold the same images (same order) as the pooled caches")
        adapters = load_adapters(args.run, "cpu")  # once, not per batch and sigma

        def tokens(rows: Tensor, sigma: float) -> tuple[float, float]:
            return token_grad_norms(adapters, tok_feats, first_caption, rows[: args.token_images], sigma)

    print("\n".join(measure(image, text[first_caption], args.batches, args.batch_size, seed=0, tokens=tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
