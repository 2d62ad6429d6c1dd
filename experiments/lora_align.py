"""LoRA on the MiniLM text encoder, trained with CS-Aligner (InfoNCE + lam * D_CS) in a loop of your own.

    PYTHONPATH=src python experiments/lora_align.py --out runs/lora --lora off,on --lam 0,1 --steps 300

The recipe, for your own loop:

    encoder = lora_minilm()                                   # frozen MiniLM + trainable rank-8 query/value updates
    text = F.normalize(encoder.encode(captions), dim=-1)      # (B, 384), graph kept down to the LoRA weights
    out = loss_fn(image_adapter(images), text_adapter(text))  # {"infonce", "cs", "loss"}
    out["loss"].backward()                                    # one AdamW steps adapters and LoRA together

Images stay on their cached EfficientNet-Lite0 features (1280-d); both sides get the MLP adapters of
docs/RESULTS.md claim 1 into a shared 512-d space. Captions are encoded live every step, one random
caption per image. `--lora off` is the frozen-MiniLM baseline with the same data, steps and seed: its
text features come from the MiniLM cache, which the script checks equals the live frozen encoder.
Each run writes `OUT/<lora|frozen>-lam<lam>-seed<k>/metrics.json` (dev retrieval, gap metrics, times).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from csaligner.adapters import MLPAdapter
from csaligner.data import load_paired_features
from csaligner.data.features import PairedFeatures
from csaligner.encoders.lora import LoraTextEncoder, lora_minilm, num_trainable
from csaligner.eval.gap import modality_gap_metrics
from csaligner.eval.retrieval import retrieval_metrics
from csaligner.losses import CSAlignerLoss
from csaligner.train import TrainConfig
from csaligner.train.schedule import lr_at

GAP_KEYS = ("centroid_distance", "paired_distance", "cs_divergence", "linear_separability")


@dataclass(frozen=True)
class RunSettings:
    """One training run.

    Attributes:
        lam: weight of D_CS (0 = InfoNCE only).
        steps: optimiser steps.
        batch_size: images per step (one random caption each).
        lr: AdamW learning rate of the adapters (claim 1's 3e-3).
        lora_lr: AdamW learning rate of the LoRA weights.
        weight_decay: AdamW weight decay (adapters and LoRA).
        warmup_fraction: linear warmup share of the steps, then cosine to zero.
        dim: shared embedding width.
        temperature: InfoNCE temperature.
        sigma: D_CS kernel bandwidth on unit-norm features.
        seed: initialisation, batch order and caption choice.
    """

    lam: float = 1.0
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    lora_lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    dim: int = 512
    temperature: float = 0.07
    sigma: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps} and {self.batch_size}")


def captions_by_image(features: PairedFeatures) -> list[list[int]]:
    """Text rows of each image, in row order (Flickr8k: 5 each)."""
    rows: list[list[int]] = [[] for _ in range(features.num_images)]
    for text_row, image_row in enumerate(features.text_to_image.tolist()):
        if image_row >= 0:
            rows[image_row].append(text_row)
    if any(not r for r in rows):
        raise ValueError("every training image needs at least one caption")
    return rows


def lr_factor(step: int, settings: RunSettings) -> float:
    """The factor on each group's lr: `csalign train`'s schedule (linear warmup, cosine to zero)."""
    schedule = TrainConfig(lr=1.0, steps=settings.steps, warmup_fraction=settings.warmup_fraction)
    return lr_at(step, settings.steps, schedule)


@torch.no_grad()
def encode_captions(encoder: LoraTextEncoder, captions: list[str], batch_size: int = 256) -> Tensor:
    """(M, D) unit-norm features with the LoRA updates merged in (eval mode, no dropout, no graph)."""
    was_training = encoder.training
    encoder.eval()
    encoder.merge()  # W + alpha/r * B A once, instead of a LoRA branch per linear per batch
    try:
        chunks = [encoder.encode(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
    finally:
        encoder.unmerge()
        encoder.train(was_training)
    return F.normalize(torch.cat(chunks), dim=-1)


def evaluate(image: Tensor, text: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """Dev retrieval (5-caption protocol) and the modality-gap metrics of claim 1."""
    metrics = retrieval_metrics(image, text, text_to_image)
    gap = modality_gap_metrics(image, text, text_to_image)
    return {**metrics, **{k: gap[k] for k in GAP_KEYS}}


def train_and_evaluate(
    train: PairedFeatures,
    dev: PairedFeatures,
    encoder: LoraTextEncoder | None,
    settings: RunSettings,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, object]:
    """Train adapters (and LoRA when `encoder` is given) on `train`, evaluate on `dev`, write metrics.json.

    Args:
        train: training features; with an encoder, `train.captions` are encoded live each step,
            without one `train.text` (the frozen encoder's cached features) is used.
        dev: dev features; with an encoder its captions are re-encoded after training.
        encoder: the LoRA text encoder (trained in place), or None for the frozen baseline.
        settings: hyper-parameters.
        out_dir: run folder; gets metrics.json.
        progress: show a tqdm bar.

    Returns:
        the metrics dict written to `out_dir / "metrics.json"`.
    """
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    text_dim = train.text.shape[1] if encoder is None else int(encoder.peft_model.config.hidden_size)
    image_adapter = MLPAdapter(train.image.shape[1], settings.dim)
    text_adapter = MLPAdapter(text_dim, settings.dim)
    loss_fn = CSAlignerLoss(lam=settings.lam, sigma=settings.sigma, temperature=settings.temperature)
    groups = [{"params": [*image_adapter.parameters(), *text_adapter.parameters()], "lr": settings.lr}]
    if encoder is not None:
        groups.append({"params": encoder.trainable_parameters(), "lr": settings.lora_lr})
        encoder.train()
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    per_image = captions_by_image(train)
    order = torch.randperm(train.num_images, generator=gen)
    cursor, last = 0, {}
    start = time.perf_counter()
    for step in (bar := tqdm(range(settings.steps), disable=not progress, desc="lora" if encoder else "frozen")):
        if cursor + settings.batch_size > train.num_images:  # new epoch: reshuffle, drop the ragged tail
            order, cursor = torch.randperm(train.num_images, generator=gen), 0
        images = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        pick = torch.randint(0, 1 << 30, (len(images),), generator=gen).tolist()
        rows = [per_image[i][p % len(per_image[i])] for i, p in zip(images.tolist(), pick, strict=True)]
        if encoder is None:
            text = train.text[rows]  # (B, 384), unit norm from the cache
        else:
            text = F.normalize(encoder.encode([train.captions[r] for r in rows]), dim=-1)  # (B, 384), with graph
        out = loss_fn(image_adapter(train.image[images]), text_adapter(text))
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(step, settings)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        last = {k: float(v.detach()) for k, v in out.items()}
        bar.set_postfix(loss=f"{last['loss']:.3f}", cs=f"{last.get('cs', 0.0):.4f}")
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    dev_text = dev.text if encoder is None else encode_captions(encoder, dev.captions)
    with torch.no_grad():
        metrics = evaluate(image_adapter(dev.image), text_adapter(dev_text), dev.text_to_image)
    result: dict[str, object] = {
        "text_encoder": "lora" if encoder is not None else "frozen",
        "settings": asdict(settings),
        "train_images": train.num_images,
        "trainable_lora": 0 if encoder is None else num_trainable(encoder),
        "trainable_adapters": num_trainable(image_adapter) + num_trainable(text_adapter),
        "final_loss_terms": last,
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - start, 1),
        "metrics": metrics,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_cache_matches_encoder(features: PairedFeatures, rows: int = 64) -> float:
    """Max |cache - live frozen MiniLM| over the first rows: the frozen baseline's text = what LoRA starts from."""
    encoder = lora_minilm()  # LoRA B starts at zero: the frozen model
    live = encode_captions(encoder, features.captions[:rows])
    diff = float((live - features.text[:rows]).abs().max())
    if diff > 1e-4:
        raise ValueError(f"cached MiniLM features differ from the live encoder by {diff:.2e}; re-encode the cache")
    return diff


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("/work/cache"), help="folder of the flickr8k-* caches")
    p.add_argument("--out", type=Path, required=True, help="run folders go here (e.g. runs/lora)")
    p.add_argument("--lora", default="off,on", help="comma list: off (frozen MiniLM), on (LoRA)")
    p.add_argument("--lam", default="0,1", help="comma list of D_CS weights")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--train-images", type=int, default=2000, help="first N Flickr8k train images")
    p.add_argument("--steps", type=int, default=RunSettings.steps)
    p.add_argument("--batch-size", type=int, default=RunSettings.batch_size)
    p.add_argument("--lr", type=float, default=RunSettings.lr)
    p.add_argument("--lora-lr", type=float, default=RunSettings.lora_lr)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    unknown = set(args.lora.split(",")) - {"off", "on"}
    if unknown:
        raise SystemExit(f"--lora takes off and/or on (comma-separated), got {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    load = load_paired_features
    train = load(args.cache / "flickr8k-train-efficientnet-lite0", args.cache / "flickr8k-train-minilm", tokens=False)
    train = train.select_images(torch.arange(min(args.train_images, train.num_images)))
    dev = load(args.cache / "flickr8k-dev-efficientnet-lite0", args.cache / "flickr8k-dev-minilm", tokens=False)
    print(f"train {train.num_images} images / {train.num_texts} captions; dev {dev.num_images} / {dev.num_texts}")
    print(f"cache vs live frozen MiniLM: max |diff| {check_cache_matches_encoder(dev):.1e}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in args.lora.split(","):
            for lam in [float(x) for x in args.lam.split(",")]:
                settings = RunSettings(
                    lam=lam, steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr, seed=seed
                )
                run_dir = args.out / f"{'lora' if mode == 'on' else 'frozen'}-lam{lam:g}-seed{seed}"
                torch.manual_seed(seed)  # LoRA A init
                encoder = lora_minilm() if mode == "on" else None
                result = train_and_evaluate(train, dev, encoder, settings, run_dir)
                m = result["metrics"]
                assert isinstance(m, dict)
                print(
                    f"{run_dir.name}: rsum {m['rsum']:.2f} i2t@1 {m['i2t_R@1']:.1f} t2i@1 {m['t2i_R@1']:.1f} "
                    f"centroid {m['centroid_distance']:.4f} sep {m['linear_separability']:.3f} "
                    f"train {result['train_s']} s eval {result['eval_s']} s"
                )


if __name__ == "__main__":
    main()
