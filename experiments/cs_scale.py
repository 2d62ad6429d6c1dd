"""Why lambda matters: the size of D_CS (and MMD, KL) and of its gradient next to InfoNCE's.

    PYTHONPATH=src python experiments/cs_scale.py --run runs/claims/runs/<InfoNCE key>/seed0

Embeds the Flickr8k train features with a trained run's adapters, draws batches of paired
(image, one caption) embeddings as the trainer does, and prints, per kernel width sigma, the batch
D_CS, its gradient norm with respect to the (unit-norm) embeddings, and the ratio to InfoNCE's
gradient norm: lambda has to be about 1 / ratio before D_CS moves the embeddings as much as InfoNCE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.data import load_paired_features
from csaligner.losses import cs_divergence, gaussian_kl, info_nce, mmd
from csaligner.train import embed


def grad_norm(fn: Callable[[Tensor, Tensor], Tensor], image: Tensor, text: Tensor) -> tuple[float, float]:
    """(value, ||d value / d (image, text)||) of fn on leaf copies of the (B, D) embeddings."""
    x, y = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    value = fn(F.normalize(x, dim=-1), F.normalize(y, dim=-1))
    gx, gy = torch.autograd.grad(value, (x, y))
    return float(value.detach()), float(torch.cat([gx.flatten(), gy.flatten()]).norm())


def measure(image: Tensor, text: Tensor, batches: int, batch_size: int, seed: int) -> list[str]:
    """Markdown table rows: one per divergence and sigma, mean over `batches` random batches."""
    gen = torch.Generator().manual_seed(seed)
    terms: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"InfoNCE (T=0.07)": info_nce}
    for s in (0.25, 0.5, 1.0, 2.0, 4.0):
        terms[f"D_CS σ={s:g}"] = lambda a, b, s=s: cs_divergence(a, b, sigma=s)
    terms["MMD σ=1"] = lambda a, b: mmd(a, b, sigma=1.0)
    terms["KL (Gaussian)"] = gaussian_kl
    stats: dict[str, list[tuple[float, float]]] = {k: [] for k in terms}
    for _ in range(batches):
        rows = torch.randperm(image.shape[0], generator=gen)[:batch_size]
        for name, fn in terms.items():
            stats[name].append(grad_norm(fn, image[rows], text[rows]))
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
    args = p.parse_args(argv)
    cache = Path(args.cache)
    feats = load_paired_features(cache / "flickr8k-train-efficientnet-lite0", cache / "flickr8k-train-minilm")
    image, text = embed(feats, args.run)  # (6000, D), (30000, D), unit norm
    first_caption = torch.zeros(image.shape[0], dtype=torch.long)
    first_caption.scatter_reduce_(
        0, feats.text_to_image, torch.arange(len(feats.text_to_image)), "amin", include_self=False
    )
    print("\n".join(measure(image, text[first_caption], args.batches, args.batch_size, seed=0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
