"""`csalign demo`: the main job end to end.

`csalign demo toy` trains adapters on two synthetic modalities with a built-in gap (seconds, no
data needed); `csalign demo flickr` (the default, what `make demo` runs) encodes real Flickr8k
images and captions with the offline encoders, trains InfoNCE-only and CS-Aligner adapters,
evaluates on Flickr8k dev and writes a report.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner.adapters import AdapterConfig, build_adapter
from csaligner.losses import AlignmentLoss, LossConfig
from csaligner.toy import appendix_b_example, two_modalities_with_gap


@dataclass(frozen=True)
class ToySettings:
    """Sizes of the toy run (small enough for seconds on a laptop CPU)."""

    n_train: int = 2000
    n_test: int = 1000
    dim: int = 32
    steps: int = 300
    batch_size: int = 256
    lr: float = 3e-3
    lam: float = 1.0
    sigma: float = 1.0
    seed: int = 0


def _train_toy(images: Tensor, texts: Tensor, objective: str, s: ToySettings) -> tuple[nn.Module, nn.Module]:
    """Train an MLP adapter per modality with `objective`; return both adapters in eval mode."""
    torch.manual_seed(s.seed)
    cfg = AdapterConfig(kind="mlp", in_dim=s.dim, out_dim=s.dim, mlp_alpha=0.5)
    img_ad, txt_ad = build_adapter(cfg), build_adapter(cfg)
    # lam and sigma weigh and shape the CS term; InfoNCE has none (its LossConfig refuses them)
    cs = {"lam": s.lam, "sigma": s.sigma} if objective == "cs_aligner" else {}
    loss_fn = AlignmentLoss(LossConfig(objective=objective, **cs))  # type: ignore[arg-type]
    opt = torch.optim.AdamW([*img_ad.parameters(), *txt_ad.parameters()], lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    for _ in range(s.steps):
        idx = torch.randint(0, images.shape[0], (s.batch_size,), generator=g)
        loss = loss_fn(img_ad(images[idx]), txt_ad(texts[idx]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    img_ad.eval()
    txt_ad.eval()
    return img_ad, txt_ad


def run_toy(out_dir: Path, s: ToySettings = ToySettings()) -> dict[str, dict[str, float]]:
    """Before / InfoNCE-only / CS-Aligner on the synthetic gap; prints a table, saves a PNG + JSON."""
    from csaligner.eval import modality_gap_metrics, plot_projection

    images, texts, _ = two_modalities_with_gap(n=s.n_train + s.n_test, dim=s.dim, seed=s.seed)
    tr, te = slice(0, s.n_train), slice(s.n_train, None)
    pairs = torch.arange(s.n_test)
    panels: dict[str, tuple[Tensor, Tensor]] = {"before (raw features)": (images[te], texts[te])}
    for name, objective in (("InfoNCE only", "infonce"), ("CS-Aligner", "cs_aligner")):
        img_ad, txt_ad = _train_toy(images[tr], texts[tr], objective, s)
        with torch.no_grad():
            panels[name] = (img_ad(images[te]), txt_ad(texts[te]))
    metrics: dict[str, dict[str, float]] = {}
    for name, (x, y) in panels.items():
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        metrics[name] = modality_gap_metrics(xn, yn, pairs, sigma=s.sigma)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_projection(
        {k: (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) for k, (x, y) in panels.items()},
        out_dir / "toy_projection.png",
    )
    ex = appendix_b_example()
    summary = {"metrics": metrics, "appendix_b": ex.__dict__, "settings": s.__dict__}
    (out_dir / "toy_metrics.json").write_text(json.dumps(summary, indent=2))
    _print_toy_table(metrics)
    print(
        f"\nAppendix B: rho={ex.rho} -> I(x;y) = {ex.mutual_information:.3f} nats, KL(p(x)||p(y)) = {ex.kl_x_to_y:.2f}"
    )
    print(f"wrote {out_dir / 'toy_projection.png'} and {out_dir / 'toy_metrics.json'}")
    return metrics


def _print_toy_table(metrics: dict[str, dict[str, float]]) -> None:
    cols = ("paired_distance", "centroid_distance", "cs_divergence", "linear_separability")
    print(f"{'setting':<24}" + "".join(f"{c:>22}" for c in cols))
    for name, m in metrics.items():
        print(f"{name:<24}" + "".join(f"{m[c]:>22.4f}" for c in cols))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job end to end (flickr: real data; toy: synthetic, seconds)",
        description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None,
    )
    p.add_argument(
        "which", nargs="?", default="flickr", choices=["flickr", "toy"], help="which demo to run (default flickr)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo); toy writes into OUT/toy"
    )
    # The rest size the flickr demo; None tells a flag given to `toy` (which has none of them) from a default.
    p.add_argument("--train-images", type=int, help="Flickr8k train images, 0 = all 6,000 (default 2000)")
    p.add_argument("--dev-images", type=int, help="Flickr8k dev images, 0 = all 1,000 (default 1000)")
    p.add_argument("--epochs", type=int, help="training epochs of each run (default 30)")
    p.add_argument("--cache", type=Path, help="feature cache folder, reused on a rerun (default cache)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    flickr = {"train_images": args.train_images, "dev_images": args.dev_images, "epochs": args.epochs}
    flickr["cache_dir"] = args.cache
    given = {k: v for k, v in flickr.items() if v is not None}
    if args.which == "toy":
        if given:
            flags = ", ".join("--" + ("cache" if k == "cache_dir" else k.replace("_", "-")) for k in given)
            raise ValueError(f"{flags} size the flickr demo; `csalign demo toy` has fixed sizes (drop them)")
        run_toy(args.out / "toy")
        return 0
    from csaligner.encoders.hf_quiet import quiet_hf_libraries
    from csaligner.flickr_demo import FlickrDemoSettings, run_flickr_demo

    settings = FlickrDemoSettings(**given, out_dir=args.out)
    with quiet_hf_libraries(logs=False):  # encoding and training show their own bars; model loading none
        run_flickr_demo(settings)
    return 0
