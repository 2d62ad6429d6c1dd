"""The paper's claims on real data: Flickr8k train features -> Flickr8k dev, several seeds each.

    PYTHONPATH=src python experiments/paper_claims.py --claims 1,2,3,4,5,6,7,8 --seeds 0,1,2 --out runs/claims

Claims 5, 7 and 8 need extra caches in --cache (commands in docs/RESULTS.md): token features of
Flickr8k train (claim 5), the first 2000 train images encoded with MiniLM and gemma3-270m plus
the dev captions encoded with gemma3-270m (claim 7), and TF-flowers train/test encoded with
EfficientNet-Lite0 (claim 8: zero- and few-shot classification with claim 1's adapters).

Every run trains adapters on the cached Flickr8k train features, evaluates on the dev features and
stores `metrics.json` in its run folder `OUT/runs/<setting key>/seed<k>/`. A run whose metrics exist
is skipped, so the script resumes, and settings shared by two claims (e.g. the best CS-Aligner run of
claim 1 is also the "all pairs" row of claim 3) are trained once. Each claim's tables and plots go into
docs/RESULTS.md between `<!-- claim:N -->` markers, so hand-written text around them survives reruns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from csaligner.data import load_paired_features
from csaligner.data.features import PairedFeatures
from csaligner.eval import format_table, plot_bars, plot_sensitivity, plot_tradeoff
from csaligner.eval import plots as _plots
from csaligner.eval.class_names import prompt_class_names
from csaligner.eval.classification import (
    CLIP_IMAGENET_TEMPLATES,
    FLOWERS102_TEMPLATES,
    class_prompts,
    few_shot_accuracy,
    zero_shot_accuracy,
)
from csaligner.eval.evaluate import (
    DEFAULT_SHOTS,
    FEW_SHOT_SEEDS,
    ClassificationData,
    cache_encoder_id,
    cache_encoder_spec,
    classification_metrics,
    evaluate_run,
    load_classification,
)
from csaligner.train import load_config, train
from csaligner.train.embed import apply_adapter, embed_texts
from csaligner.train.model import load_adapters

_plots.DPI = 100  # small committed PNGs
GAP = ["centroid_distance", "paired_distance", "cs_divergence", "linear_separability"]
RETRIEVAL = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
T2I = ["t2i_frechet_distance", "t2i_paired_cosine", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
PRIOR = "{kind: prior, num_layers: 2, num_heads: 8, head_dim: 32}"  # paper: 10 layers, 16 heads
LAMBDAS = [0.0, 0.01, 0.1, 1.0, 3.0, 10.0]
SIGMAS = [0.25, 0.5, 1.0, 2.0, 4.0]
# λ grid per divergence for --div-grid; KL's gradient is ~20x InfoNCE's at batch 512, so it goes lower.
DIV_GRID = {"mmd": [0.1, 1.0, 10.0], "kl": [0.001, 0.01, 0.1, 1.0, 10.0]}


# Feature sets: name -> (train image cache, train text cache, dev image cache, dev text cache), in --cache.
DATA = {
    "base": (
        "flickr8k-train-efficientnet-lite0",
        "flickr8k-train-minilm",
        "flickr8k-dev-efficientnet-lite0",
        "flickr8k-dev-minilm",
    ),
    # Token features (fp16 storage) for the token-level term; evaluated on the pooled dev features.
    "tokens": (
        "flickr8k-train-efficientnet-lite0-tokens",
        "flickr8k-train-minilm-tokens",
        "flickr8k-dev-efficientnet-lite0",
        "flickr8k-dev-minilm",
    ),
    # The first 2000 train images (gemma3-270m encodes ~10 captions/s on this CPU: all 30k would take ~1 h).
    "minilm-2000": (
        "flickr8k-train2000-efficientnet-lite0",
        "flickr8k-train2000-minilm",
        "flickr8k-dev-efficientnet-lite0",
        "flickr8k-dev-minilm",
    ),
    "gemma-2000": (
        "flickr8k-train2000-efficientnet-lite0",
        "flickr8k-train2000-gemma3-270m",
        "flickr8k-dev-efficientnet-lite0",
        "flickr8k-dev-gemma3-270m",
    ),
}


# Class-folder caches for claim 8 (train: few-shot draws, test: zero- and few-shot scoring), in --cache.
FLOWERS = ("flowers-train-efficientnet-lite0", "flowers-test-efficientnet-lite0")
FLOWER_TEMPLATE = FLOWERS102_TEMPLATES[0]  # CLIP's Flowers102 prompt (Radford et al. 2021)
# TF-flowers' folder names are plural ("roses"); these are the singular names a caption would use.
SINGULAR = {"roses": "rose", "sunflowers": "sunflower", "tulips": "tulip"}
# Zero-shot prompt sets: name -> (metric, templates, class renames). "clip" is what `csalign eval` does by default.
ZERO_SHOT = {
    "clip": ("zero_shot_top1", CLIP_IMAGENET_TEMPLATES, {}),
    "flower": ("zero_shot_flower_top1", FLOWERS102_TEMPLATES, {}),
    "clip-singular": ("zero_shot_singular_top1", CLIP_IMAGENET_TEMPLATES, SINGULAR),
    "flower-singular": ("zero_shot_singular_flower_top1", FLOWERS102_TEMPLATES, SINGULAR),
}
FROZEN = "frozen features, no adapter"
CLASSIFICATION = [*(m for m, _, _ in ZERO_SHOT.values()), *(f"few_shot_{k}-shot" for k in DEFAULT_SHOTS)]


# Dev token caches attached to a feature set's (pooled, fp32) dev features: evaluate_run then also
# reports the held-out token-level D_CS ("token_cs_divergence").
DEV_TOKENS = {"tokens": ("flickr8k-dev-efficientnet-lite0-tokens", "flickr8k-dev-minilm-tokens")}


@dataclass(frozen=True)
class Setting:
    """One row of a table: a label, the config overrides on top of the base setting, the feature set."""

    label: str
    overrides: tuple[str, ...]
    data: str = "base"

    @property
    def key(self) -> str:
        """Folder name: readable prefix + hash of the overrides (equal settings share runs)."""
        digest = hashlib.sha1("\n".join(sorted(self.all_overrides)).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(o.split(".", 1)[-1] for o in self.overrides))[:60]
        return f"{slug.strip('-')}-{digest}"

    @property
    def all_overrides(self) -> tuple[str, ...]:
        """The overrides plus, for a non-base feature set, the cache paths (so run keys differ)."""
        if self.data == "base":
            return self.overrides
        img, txt = DATA[self.data][:2]
        return (f"data.image_cache={img}", f"data.text_cache={txt}", *self.overrides)


class Runner:
    """Trains and evaluates settings (resumable), holding the features once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache)
        self.out = Path(args.out)
        self.log = open(self.out / "progress.log", "a")  # noqa: SIM115 - closed at exit by the OS
        self._features: dict[str, tuple[PairedFeatures, PairedFeatures]] = {}
        self._flowers: ClassificationData | None = None

    def features(self, data: str) -> tuple[PairedFeatures, PairedFeatures]:
        """(train, dev) features of a feature set, loaded once; other sets are released (tokens are big)."""
        if data not in self._features:
            self._features = {k: v for k, v in self._features.items() if k == "base"}
            train_img, train_txt, dev_img, dev_txt = (self.cache / d for d in DATA[data])
            train_feats = load_paired_features(train_img, train_txt)
            dev_feats = load_paired_features(dev_img, dev_txt, tokens=False)
            if data in DEV_TOKENS:
                tok = load_paired_features(*(self.cache / d for d in DEV_TOKENS[data]), dtype=None)
                if tok.image_ids != dev_feats.image_ids or tok.captions != dev_feats.captions:
                    raise ValueError(f"{DEV_TOKENS[data]} do not hold the dev features' images and captions")
                dev_feats.image_tokens, dev_feats.image_token_mask = tok.image_tokens, tok.image_token_mask
                dev_feats.text_tokens, dev_feats.text_token_mask = tok.text_tokens, tok.text_token_mask
            self._features[data] = (train_feats, dev_feats)
        return self._features[data]

    def base(self) -> list[str]:
        a = self.args
        return [
            f"data.image_cache={self.cache / DATA['base'][0]}",
            f"data.text_cache={self.cache / DATA['base'][1]}",
            "model.image={kind: mlp}",
            "model.text={kind: mlp}",
            "model.out_dim=512",
            "loss.temperature=0.07",
            "loss.sigma=1.0",
            f"train.epochs={a.epochs}",
            f"train.batch_size={a.batch_size}",
            f"train.lr={a.lr}",
            "train.weight_decay=0.05",
            "train.device=cpu",
            "train.progress=false",
            "train.tensorboard=false",
            "train.checkpoint_every=0",
            "train.log_every=10",
            # A run trained but not yet evaluated (interrupted in between) is taken up, not refused.
            "train.resume=auto",
        ]

    def metrics(self, setting: Setting, seed: int) -> dict[str, float]:
        """Metrics of one (setting, seed), training and evaluating it unless stored."""
        run_dir = self.out / "runs" / setting.key / f"seed{seed}"
        path = run_dir / "metrics.json"
        if path.is_file():
            return json.loads(path.read_text())["metrics"]
        t0 = time.time()
        data = [f"{o.split('=', 1)[0]}={self.cache / o.split('=', 1)[1]}" for o in setting.all_overrides[:2]]
        extra = data if setting.data != "base" else []
        overrides = [*self.base(), *extra, *setting.overrides, f"train.seed={seed}", f"train.out_dir={run_dir}"]
        train_feats, dev_feats = self.features(setting.data)
        train(load_config(None, overrides), features=train_feats)
        t1 = time.time()
        metrics = evaluate_run(run_dir, dev_feats, sigma=1.0)
        t2 = time.time()
        record = {"label": setting.label, "seed": seed, "overrides": overrides, "metrics": metrics}
        record |= {"train_s": t1 - t0, "eval_s": t2 - t1}
        path.write_text(json.dumps(record, indent=1))
        msg = f"{time.strftime('%H:%M:%S')} {setting.label} seed {seed}: train {t1 - t0:.0f}s eval {t2 - t1:.0f}s"
        print(
            f"{msg} rsum {metrics['rsum']:.1f} centroid {metrics['centroid_distance']:.3f}", file=self.log, flush=True
        )
        return metrics

    def table(
        self, settings: list[Setting], columns: list[str], seeds: list[int], classification: bool = False
    ) -> dict[str, dict[str, list[float]]]:
        """{label: {metric: per-seed values}} for format_table / plot_bars (TF-flowers metrics if `classification`)."""
        rows = {}
        metrics = self.classification if classification else self.metrics
        for s in settings:
            per_seed = [metrics(s, seed) for seed in seeds]
            rows[s.label] = {c: [m[c] for m in per_seed] for c in columns}
        return rows

    def flowers(self) -> ClassificationData:
        """TF-flowers features; prompts are encoded with the base dev text cache's encoder (the runs')."""
        if self._flowers is None:
            text = self.cache / DATA["base"][3]
            train_cache, test_cache = (self.cache / c for c in FLOWERS)
            self._flowers = load_classification(
                train_cache, test_cache, cache_encoder_spec(text), cache_encoder_id(text)
            )
        return self._flowers

    def classification(self, setting: Setting, seed: int) -> dict[str, float]:
        """TF-flowers zero-shot (each prompt set of ZERO_SHOT) and few-shot accuracy of a trained (setting, seed),
        stored beside its metrics.json (recomputed when it lacks a prompt set); trains the run first if needed."""
        self.metrics(setting, seed)
        run_dir = self.out / "runs" / setting.key / f"seed{seed}"
        path = run_dir / "flowers.json"
        if path.is_file():
            stored = json.loads(path.read_text())["metrics"]
            if all(m in stored for m, _, _ in ZERO_SHOT.values()):
                return stored
        t0 = time.time()
        data = self.flowers()
        metrics = classification_metrics(run_dir, data, DEFAULT_SHOTS)  # CLIP's 7 templates, folder names
        for metric, templates, renames in list(ZERO_SHOT.values())[1:]:
            names = prompt_class_names(data.class_names, renames)
            zs = classification_metrics(run_dir, data, (1,), templates=templates, class_names=names)
            metrics |= {metric: zs["zero_shot_top1"]}
            metrics |= {metric.replace("_top1", "_mean_per_class"): zs["zero_shot_mean_per_class"]}
        per_class, draws = per_class_and_draws(run_dir, data)
        check_breakdown(metrics, per_class, draws, data)
        prompts = {n: {"templates": list(t), "class_names": prompt_class_names(data.class_names, r)}
                   for n, (_, t, r) in ZERO_SHOT.items()}  # fmt: skip
        record = {"label": setting.label, "seed": seed, "class_names": data.class_names, "prompts": prompts}
        record |= {"metrics": metrics}
        record |= {"zero_shot_per_class": per_class, "few_shot_per_draw": draws, "eval_s": time.time() - t0}
        path.write_text(json.dumps(record, indent=1))
        msg = f"{time.strftime('%H:%M:%S')} {setting.label} seed {seed}: flowers {time.time() - t0:.0f}s"
        print(f"{msg} zero-shot {metrics['zero_shot_top1']:.1f} 16-shot {metrics['few_shot_16-shot']:.1f}",
              file=self.log, flush=True)  # fmt: skip
        return metrics


def few_shot_draws(train: torch.Tensor, test: torch.Tensor, data: ClassificationData) -> dict[str, list[float]]:
    """{"k-shot": accuracy of each draw in FEW_SHOT_SEEDS}; few_shot_accuracy seeds its generator per draw, so a
    call per seed draws the same images as one call with all seeds (the same images for every run, too)."""
    per_seed = [
        few_shot_accuracy(train, data.train_labels, test, data.test_labels, DEFAULT_SHOTS, seeds=(s,))
        for s in FEW_SHOT_SEEDS
    ]
    return {f"{k}-shot": [d[f"{k}-shot"] for d in per_seed] for k in DEFAULT_SHOTS}


def per_class_and_draws(
    run_dir: Path, data: ClassificationData
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-class zero-shot accuracy for each prompt set of ZERO_SHOT ({"clip": (C,), ...}) and per-draw few-shot
    accuracy, in percent, scored as `classification_metrics` scores them (its dict holds only the means)."""
    adapters = load_adapters(str(run_dir), "cpu")
    train, test = (
        F.normalize(apply_adapter(adapters.image, x), dim=-1) for x in (data.train_features, data.test_features)
    )
    per_class = {}
    for name, (_, templates, renames) in ZERO_SHOT.items():
        prompts = class_prompts(prompt_class_names(data.class_names, renames), templates)  # C lists of P prompts
        flat = [p for per_class in prompts for p in per_class]
        text = embed_texts(adapters, run_dir, flat, data.text_encoder, expect_id=data.text_encoder_id or None)
        class_text = F.normalize(text, dim=-1).reshape(len(prompts), len(prompts[0]), -1)  # (C, P, 512)
        per_class[name] = zero_shot_accuracy(test, class_text, data.test_labels)["per_class"]
    return per_class, few_shot_draws(train, test, data)


def check_breakdown(
    metrics: dict[str, float],
    per_class: dict[str, list[float]],
    draws: dict[str, list[float]],
    data: ClassificationData,
) -> None:
    """The per-class and per-draw numbers must average to classification_metrics' (same scoring, recomputed)."""
    counts = torch.bincount(data.test_labels).double()
    pairs = [
        (float(torch.tensor(per_class[n], dtype=torch.float64) @ counts / counts.sum()), metrics[m])
        for n, (m, _, _) in ZERO_SHOT.items()
    ]
    pairs += [(statistics.mean(v), metrics[f"few_shot_{k}"]) for k, v in draws.items()]
    if any(abs(a - b) > 1e-6 for a, b in pairs):
        raise RuntimeError(f"per-class / per-draw accuracies do not average to classification_metrics': {pairs}")


def cs(lam: float, *extra: str) -> tuple[str, ...]:
    return ("loss.objective=cs_aligner", f"loss.lam={lam}", *extra)


def claim1_settings() -> list[Setting]:
    return [
        Setting("InfoNCE", ("loss.objective=infonce",)),
        Setting("CS-Aligner λ=0.01", cs(0.01)),
        Setting("CS-Aligner λ=1", cs(1.0)),
        Setting("CS-Aligner λ=10", cs(10.0)),
    ]


def best_lambda(runner: Runner) -> float:
    """The claim-1 CS-Aligner lambda with the highest mean dev rsum (runs claim 1 if needed)."""
    if runner.args.lam != "auto":
        return float(runner.args.lam)
    rows = runner.table(claim1_settings()[1:], ["rsum"], runner.args.seeds)
    label = max(rows, key=lambda k: statistics.mean(rows[k]["rsum"]))
    return float(label.split("=")[1])


def command(args: argparse.Namespace, claim: str) -> str:
    seeds = ",".join(map(str, args.sweep_seeds if claim == "6-sweeps" else args.seeds))
    base = f"PYTHONPATH=src python experiments/paper_claims.py --claims {claim.split('-')[0]} --out {args.out}"
    extra = f" --sweep-seeds {seeds}" if claim == "6-sweeps" else f" --seeds {seeds}"
    opts = f" --epochs {args.epochs} --lr {args.lr} --batch-size {args.batch_size} --lam {args.lam}"
    if claim in ("3", "4"):
        opts += f" --also-lam {args.also_lam:g}"
    if claim == "5":
        opts += f" --token-lams {','.join(f'{t:g}' for t in args.token_lams)} --token-images {args.token_images}"
    if claim.startswith("6") and args.div_grid:
        opts += " --div-grid"
    if args.threads != 1:
        opts += f" --threads {args.threads}"
    return f"{base}{extra}{opts}"


def block(args: argparse.Namespace, claim: str, text: str, table: dict, columns: list[str] | None = None) -> str:
    """Text, the command that reproduces the table, then the table (recalls to 0.01, the rest to 1e-3/1e-4)."""
    cols = columns or list(next(iter(table.values())))
    recall = [c for c in cols if "R@" in c or c == "rsum"]
    other = [c for c in cols if c not in recall]
    tables = []
    for group, digits in ((recall, 2), (other, 4 if "cs_divergence" in other else 3)):
        if group:
            tables.append(format_table({row: {c: v[c] for c in group} for row, v in table.items()}, digits=digits))
    return f"{text}\n\n```\n{command(args, claim)}\n```\n\n" + "\n\n".join(tables) + "\n"


def fig(name: str) -> Path:
    return Path("docs/results") / name


def claim1(runner: Runner) -> str:
    seeds = runner.args.seeds
    table = runner.table(claim1_settings(), RETRIEVAL + GAP, seeds)
    plot_bars(table, fig("claim1_bars.png"), ["rsum", "centroid_distance", "cs_divergence", "linear_separability"])
    text = f"MLP adapters on both sides to 512-d; seeds {seeds}; Flickr8k dev (1000 images, 5000 captions)."
    return block(runner.args, "1", text, table) + "\n![claim 1](results/claim1_bars.png)\n"


def claim2(runner: Runner) -> str:
    lam = best_lambda(runner)
    t2i = ("model.image={kind: identity}", f"model.text={PRIOR}", "model.out_dim=0")
    settings = [
        Setting("L2 prior (Eclipse)", ("loss.objective=l2_prior", *t2i)),
        Setting("InfoNCE", ("loss.objective=infonce", *t2i)),
        Setting(f"CS-Aligner λ={lam:g}", cs(lam, *t2i)),
    ]
    table = runner.table(settings, [*T2I, "centroid_distance", "cs_divergence"], runner.args.seeds)
    text = (
        "Image side identity (frozen 1280-d EfficientNet-Lite0 space); text side a prior transformer with "
        "2 layers, 8 heads of 32 (the paper's prior has 10 layers, 16 heads). Fréchet distance between mapped "
        f"dev captions and the dev images' raw features (lower is better). Seeds {runner.args.seeds}."
    )
    return block(runner.args, "2", text, table)


def lambdas(runner: Runner) -> list[float]:
    """The best claim-1 lambda, plus --also-lam when it differs (D_CS barely acts at a tiny lambda)."""
    best = best_lambda(runner)
    also = runner.args.also_lam
    return [best] if also is None or also == best else [best, also]


def claim3(runner: Runner) -> str:
    return "\n".join(_claim3(runner, lam) for lam in lambdas(runner))


def _claim3(runner: Runner, lam: float) -> str:
    steps = runner.args.epochs * (6000 // runner.args.batch_size)  # 100% pairs: full batches per epoch
    fixed = (f"train.steps={steps}",)
    settings = [
        Setting(f"λ={lam:g}, 50% pairs only", cs(lam, "data.paired_fraction=0.5", "data.use_unpaired=false", *fixed)),
        Setting(
            f"λ={lam:g}, 50% pairs + 50% unpaired in D_CS",
            cs(lam, "data.paired_fraction=0.5", "data.use_unpaired=true", *fixed),
        ),
        Setting(f"λ={lam:g}, 100% pairs", cs(lam)),  # = claim 1's run: 10 epochs of full batches is the same step count
    ]
    table = runner.table(settings, RETRIEVAL + GAP, runner.args.seeds)
    text = (
        f"CS-Aligner λ={lam:g}; every row runs {steps} steps. The unpaired half's images and "
        "captions are shuffled independently and enter only the CS term."
    )
    return block(runner.args, "3", text, table)


def claim4(runner: Runner) -> str:
    settings = []
    for lam in lambdas(runner):
        settings.append(Setting(f"λ={lam:g}, 1 caption in D_CS", cs(lam)))
        settings.append(Setting(f"λ={lam:g}, 5 captions in D_CS", cs(lam, "data.captions_per_image_in_cs=all")))
    table = runner.table(settings, RETRIEVAL + GAP, runner.args.seeds)
    text = f"CS-Aligner; InfoNCE always sees one random caption per image; seeds {runner.args.seeds}."
    return block(runner.args, "4", text, table)


def claim5(runner: Runner) -> str:
    lam, k = best_lambda(runner), runner.args.token_images
    tok = ("data.use_tokens=true", f"data.token_images={k}")
    settings = [Setting(f"λ={lam:g}, no token term", cs(lam), "tokens")]
    settings += [
        Setting(f"λ={lam:g} + token D_CS, token λ={t:g}", cs(lam, *tok, f"loss.token_lam={t}"), "tokens")
        for t in runner.args.token_lams
    ]
    table = runner.table(settings, [*RETRIEVAL, *GAP, "token_cs_divergence"], runner.args.seeds)
    text = (
        "Base setting on the token caches (pooled features identical to the base caches up to fp16 storage). "
        "The token term is D_CS between one image's 49 EfficientNet-Lite0 feature-map cells and the word "
        "tokens of one of its captions, both mapped token by token through the same MLP adapters, averaged "
        f"over the first {k} images of each batch (`data.token_images`). `token_cs_divergence` is that term "
        "on the dev set (each dev image's cells vs its first caption's tokens, σ=1). "
        f"Seeds {runner.args.seeds}."
    )
    return block(runner.args, "5", text, table)


def claim7(runner: Runner) -> str:
    steps = f"train.steps={runner.args.epochs * (6000 // runner.args.batch_size)}"  # as many steps as the base
    lam = best_lambda(runner)
    settings = [
        Setting(f"{name}: {label}", (*objective, steps), data)
        for name, data in (("MiniLM", "minilm-2000"), ("gemma3-270m", "gemma-2000"))
        for label, objective in (("InfoNCE", ("loss.objective=infonce",)), (f"CS-Aligner λ={lam:g}", cs(lam)))
    ]
    table = runner.table(settings, RETRIEVAL + GAP, runner.args.seeds)
    text = (
        "Train on the first 2000 Flickr8k train images (10,000 captions), 110 steps (as many as the base "
        "runs), evaluate on the full dev split; image side EfficientNet-Lite0 throughout, text side MiniLM "
        f"(384-d) or gemma3-270m (640-d, mean of the last hidden states). Seeds {runner.args.seeds}."
    )
    return block(runner.args, "7", text, table)


def _curves(table: dict, xs: list[float], metric: str) -> list[tuple[float, float]]:
    rows = list(table.values())
    return [
        (statistics.mean(r[metric]), statistics.stdev(r[metric]) if len(r[metric]) > 1 else 0.0)
        for r in rows[: len(xs)]
    ]


def sweep(runner: Runner, name: str, xs: list[float], make: Callable[[float], Setting], xlabel: str) -> str:
    seeds = runner.args.sweep_seeds
    table = runner.table([make(x) for x in xs], ["rsum", *GAP], seeds)
    logx = name == "lambda"
    xs_plot = [x if x > 0 or not logx else 1e-3 for x in xs]  # λ=0 drawn at 1e-3 on the log axis
    plot_sensitivity(xs_plot, {"rsum": _curves(table, xs, "rsum")}, xlabel, "dev rsum", fig(f"{name}_rsum.png"), logx)
    gap = {m: _curves(table, xs, m) for m in ("centroid_distance", "linear_separability")}
    plot_sensitivity(xs_plot, gap, xlabel, "gap metric", fig(f"{name}_gap.png"), logx)
    figs = f"![{name} rsum](results/{name}_rsum.png) ![{name} gap](results/{name}_gap.png)"
    return block(runner.args, "6-sweeps", f"Seeds {seeds}.", table) + f"\n{figs}\n"


def claim6(runner: Runner) -> str:
    lam = best_lambda(runner)
    out = ["### Lambda sensitivity (σ=1)\n"]
    out.append(sweep(runner, "lambda", LAMBDAS, lambda x: Setting(f"λ={x:g}", cs(x)), "lambda (λ=0 plotted at 1e-3)"))
    out.append(f"### Sigma sensitivity (λ={lam:g}; the D_CS column is always measured at σ=1)\n")
    out.append(
        sweep(
            runner,
            "sigma",
            SIGMAS,
            lambda x: Setting(f"σ={x:g}", cs(lam, *([f"loss.sigma={x}"] if x != 1 else []))),
            "sigma",
        )
    )
    divs = [
        Setting(f"{name} λ={lam:g}", (f"loss.objective={obj}", f"loss.lam={lam}"))
        for name, obj in (("CS", "cs_aligner"), ("MMD", "mmd"), ("KL", "kl"))
    ]
    table = runner.table(divs, RETRIEVAL + GAP, runner.args.seeds)
    out.append("### Divergence ablation (same λ; the divergences' scales differ)\n")
    out.append(block(runner.args, "6", f"Seeds {runner.args.seeds}.", table))
    if runner.args.div_grid:
        grid = [
            Setting(f"{o} λ={x:g}", (f"loss.objective={o}", f"loss.lam={x}")) for o, xs in DIV_GRID.items() for x in xs
        ]
        table = runner.table(grid, ["rsum", *GAP], runner.args.sweep_seeds)
        out.append(block(runner.args, "6-sweeps", f"λ grid per divergence, seeds {runner.args.sweep_seeds}.", table))
        cs_table = runner.table(
            [Setting(f"cs λ={x:g}", cs(x)) for x in LAMBDAS], ["rsum", *GAP], runner.args.sweep_seeds
        )
        out.append(frontier(cs_table | table))
    return "\n".join(out)


def frontier(table: dict[str, dict[str, list[float]]]) -> str:
    """Gap closed vs retrieval kept, one line per divergence over its λ grid (means over seeds)."""
    curves: dict[str, list[tuple[str, float, float]]] = {}
    for label, row in table.items():
        name, lam = label.split(" ", 1)
        point = (lam, statistics.mean(row["centroid_distance"]), statistics.mean(row["rsum"]))
        curves.setdefault({"cs": "CS", "mmd": "MMD", "kl": "Gaussian KL"}[name], []).append(point)
    path = fig("divergence_frontier.png")
    xlabel, title = "dev centroid distance (lower = smaller gap)", "Gap vs retrieval (means over seeds)"
    plot_tradeoff(curves, xlabel, "dev rsum", path, title=title, ylim=(225, 292))
    return f"\n![gap vs retrieval per divergence](results/{path.name})\n"


def claim8(runner: Runner) -> str:
    seeds, data, settings = runner.args.seeds, runner.flowers(), claim1_settings()
    table = runner.table(settings, CLASSIFICATION, seeds, classification=True)
    for label, row in runner.table(settings, ["rsum"], seeds).items():  # stored: shows these are claim 1's adapters
        table[label]["flickr8k_dev_rsum"] = row["rsum"]
    # Reference: prototypes on the frozen 1280-d EfficientNet-Lite0 features, no adapter (no zero-shot: no text side).
    frozen = few_shot_draws(data.train_features, data.test_features, data)
    table[FROZEN] = {f"few_shot_{k}": v for k, v in frozen.items()}
    names = {"zero_shot_top1": "zero-shot (CLIP 7 templates)", "zero_shot_flower_top1": "zero-shot (flower template)"}
    names |= {"zero_shot_singular_top1": "zero-shot (CLIP 7, singular)"}
    names |= {"zero_shot_singular_flower_top1": "zero-shot (flower, singular)"}
    names |= {f"few_shot_{k}-shot": f"{k}-shot" for k in DEFAULT_SHOTS} | {"flickr8k_dev_rsum": "Flickr8k dev rsum"}
    shown = {row: {names[c]: v for c, v in cols.items()} for row, cols in table.items()}
    plot_flowers(table, [names[m] for m, _, _ in ZERO_SHOT.values()], fig("claim8_flowers.png"))
    text = (
        f"Claim 1's adapters (Flickr8k train, seeds {seeds}; their Flickr8k dev rsum in the last column) on "
        "TF-flowers: zero-shot top-1 on the 1000 test images (200 per class, 5 classes, chance 20 %), prompts "
        "averaged over CLIP's 7 ImageNet templates (the library default, `--templates clip-imagenet-7`) or "
        f'CLIP\'s Flowers102 template "{FLOWER_TEMPLATE}" (`--templates flowers102`), with the class-folder names '
        "as class names (plural: roses, sunflowers, tulips) or, in the singular columns, with "
        f"`--class-names {','.join(f'{k}={v}' for k, v in SINGULAR.items())}` (daisy and dandelion unchanged); "
        "few-shot: nearest normalised class mean "
        "(the library's prototype method) of k train images per class, averaged over "
        f"{len(FEW_SHOT_SEEDS)} draws (draw seeds {list(FEW_SHOT_SEEDS)}, the same images for every row). "
        "The last row scores the same prototypes on the frozen 1280-d EfficientNet-Lite0 features (no adapter; "
        "no zero-shot, which needs a text side). Accuracy in %. ± is the sample std over training seeds (each "
        "value already the mean of the draws), except in the last row, which has no training seed: there it is "
        "the std over the draws."
    )
    body = f"{text}\n\n```\n{command(runner.args, '8')}\n```\n\n" + format_table(shown, digits=2) + "\n"
    body += "\nFew-shot accuracy of the adapted features minus the frozen features' on the same draw (points; "
    body += "mean [min, max] over 3 training seeds x 3 draws):\n\n" + paired_table(runner, settings, seeds, frozen)
    body += "\n\nZero-shot accuracy per class (%, mean over training seeds), prompt sets in the order "
    body += "CLIP's 7 templates / flower template / CLIP's 7 singular / flower singular:\n\n"
    body += per_class_table(runner, settings, seeds, data.class_names) + "\n"
    return body + "\n![claim 8](results/claim8_flowers.png)\n"


def plot_flowers(table: dict[str, dict[str, list[float]]], prompt_names: list[str], path: Path) -> Path:
    """Two panels: zero-shot top-1 per setting, one bar per prompt set (chance dashed); few-shot accuracy vs k."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 4.2))
    zero, few = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    adapted = [s for s in table if s != FROZEN]
    width = 0.8 / len(ZERO_SHOT)
    for j, ((metric, _, _), name) in enumerate(zip(ZERO_SHOT.values(), prompt_names, strict=True)):
        vals = [table[s][metric] for s in adapted]
        xs = [i + (j - (len(ZERO_SHOT) - 1) / 2) * width for i in range(len(adapted))]
        means = [statistics.mean(v) for v in vals]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        label = name.removeprefix("zero-shot ").strip("()")
        zero.bar(xs, means, width, yerr=stds, capsize=2, label=label, color=f"C{j}")
    zero.axhline(20.0, color="grey", linestyle="--", linewidth=1, label="chance (5 classes)")
    zero.set_xticks(range(len(adapted)), adapted, fontsize=8)
    zero.set(ylabel="top-1 accuracy (%)", title="Zero-shot on TF-flowers test (mean ± std over 3 seeds)")
    zero.set_ylim(0, 48)  # room above the bars for the legend
    zero.legend(fontsize=7, ncols=3, loc="upper center")
    shots = list(DEFAULT_SHOTS)
    for i, setting in enumerate(table):
        vals = [table[setting][f"few_shot_{k}-shot"] for k in shots]
        means = [statistics.mean(v) for v in vals]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        style = {"color": "black", "linestyle": "--"} if setting == FROZEN else {"color": f"C{i}"}
        few.errorbar(shots, means, yerr=stds, marker="o", capsize=2, label=setting, **style)
    few.set_xscale("log", base=2)
    few.set_xticks(shots, [str(k) for k in shots])
    few.set(xlabel="images per class (k)", ylabel="accuracy (%)", title="Few-shot prototypes (mean ± std)")
    few.legend(fontsize=7)
    for ax in (zero, few):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=_plots.DPI)
    return path


def flowers_records(runner: Runner, setting: Setting, seeds: list[int]) -> list[dict]:
    return [json.loads((runner.out / "runs" / setting.key / f"seed{s}" / "flowers.json").read_text()) for s in seeds]


def paired_table(runner: Runner, settings: list[Setting], seeds: list[int], frozen: dict[str, list[float]]) -> str:
    """Markdown table: adapted minus frozen few-shot accuracy, draw by draw (the draws are the same images)."""
    head = "| setting | " + " | ".join(frozen) + " |\n| --- |" + " ---: |" * len(frozen) + "\n"
    lines = []
    for s in settings:
        records = flowers_records(runner, s, seeds)
        cells = []
        for k, base in frozen.items():
            diffs = [r["few_shot_per_draw"][k][i] - base[i] for r in records for i in range(len(base))]
            cells.append(f"{statistics.mean(diffs):+.1f} [{min(diffs):+.1f}, {max(diffs):+.1f}]")
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def per_class_table(runner: Runner, settings: list[Setting], seeds: list[int], class_names: list[str]) -> str:
    """Markdown table of per-class zero-shot accuracy (mean over seeds), every prompt set of ZERO_SHOT in each cell."""
    rows: dict[str, dict[str, str]] = {}
    for s in settings:
        records = flowers_records(runner, s, seeds)
        cells = {}
        for c, name in enumerate(class_names):
            means = (statistics.mean(r["zero_shot_per_class"][p][c] for r in records) for p in ZERO_SHOT)
            cells[name] = " / ".join(f"{m:.1f}" for m in means)
        rows[s.label] = cells
    head = "| setting | " + " | ".join(class_names) + " |\n| --- |" + " ---: |" * len(class_names) + "\n"
    return head + "\n".join(f"| {label} | " + " | ".join(cells.values()) + " |" for label, cells in rows.items())


CLAIMS = {"1": claim1, "2": claim2, "3": claim3, "4": claim4, "5": claim5, "6": claim6, "7": claim7, "8": claim8}


def update_results(path: Path, claim: str, body: str) -> None:
    """Replace the text between <!-- claim:N --> and <!-- /claim:N --> (appended if absent)."""
    text = path.read_text() if path.is_file() else "# Results\n"
    start, end = f"<!-- claim:{claim} -->", f"<!-- /claim:{claim} -->"
    new = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + new + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{new}\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--claims", default="1,2,3,4,6", help="claim numbers, e.g. 1,2 (1-8; 5, 7, 8 need extra caches)")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="training seeds for claims 1-4 and the ablation")
    p.add_argument("--sweep-seeds", type=ints, default=[0], help="seeds for the lambda / sigma sweeps")
    p.add_argument("--out", default="runs/claims", help="folder for run folders and progress.log")
    p.add_argument(
        "--cache", default="/work/cache", help="folder holding the flickr8k-{train,dev}-* (and flowers-*) caches"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lam", default="auto", help='lambda for claims 2-4 and 6, or "auto" (best of claim 1)')
    p.add_argument(
        "--also-lam", type=float, default=1.0, help="second λ for claims 3 and 4 (equal to the best λ: no second set)"
    )
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--token-lams", type=floats, default=[1.0, 10.0], help="token-level CS weights for claim 5")
    p.add_argument("--token-images", type=int, default=64, help="images per batch in the token-level term (claim 5)")
    p.add_argument("--div-grid", action="store_true", help="also sweep λ in {0.1,1,10} for MMD and KL")
    p.add_argument("--results", default="docs/RESULTS.md")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    unknown = set(args.claims.split(",")) - set(CLAIMS)
    if unknown:
        p.error(f"unknown claims {sorted(unknown)}; choose from {sorted(CLAIMS)}")
    if any(not t > 0 for t in args.token_lams):  # a token term at weight 0 is refused by the run config
        p.error(f"--token-lams must all be > 0, got {args.token_lams}: claim 5's 'no token term' row is the 0 baseline")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig("x").parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    for claim in args.claims.split(","):
        update_results(Path(args.results), claim, CLAIMS[claim](runner))
        print(f"claim {claim} written to {args.results}", file=runner.log, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
