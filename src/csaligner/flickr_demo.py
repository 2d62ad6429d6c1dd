"""The main job on real data: Flickr8k with the offline encoders, InfoNCE-only vs CS-Aligner.

Steps (each reuses its output when it is already there):
1. encode a Flickr8k train subset and the dev split with EfficientNet-Lite0 (images) and MiniLM
   (captions) into feature caches;
2. train MLP adapters on both sides with InfoNCE only and with CS-Aligner (same settings, seed). A
   finished run is reused only when its saved config equals this call's; otherwise it is trained
   again (saying which settings changed). An interrupted run with the same settings resumes;
3. evaluate both on dev (retrieval, modality gap), write a report with plots and a retrieval
   preview, and print a short table.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csaligner.cli import main as cli_main
from csaligner.data.features import PairedFeatures


@dataclass(frozen=True)
class FlickrDemoSettings:
    """Sizes and hyper-parameters of the demo (defaults fit in minutes on a 2-core CPU)."""

    train_images: int = 2000
    """Flickr8k train images to encode and train on (all 5 captions each); 0 = all 6,000."""
    dev_images: int = 1000
    """Flickr8k dev images to evaluate on; 0 = all 1,000."""
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    lam: float = 1.0
    """CS weight of the CS-Aligner run (see docs/RESULTS.md for why not the paper's 0.01 here)."""
    sigma: float = 1.0
    seed: int = 0
    cache_dir: Path = Path("cache")
    out_dir: Path = Path("runs/demo")

    def __post_init__(self) -> None:
        # Checked before anything is encoded: a bad value otherwise surfaces minutes later, inside a subcommand.
        for name, low in (("train_images", 0), ("dev_images", 0), ("epochs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                zero = " (0 = the whole split)" if low == 0 else ""
                raise ValueError(f"{flag} must be an integer >= {low}{zero}, got {value!r}")


def _spec(split: str, n: int) -> str:
    return f"flickr8k:{split}" + (f":{n}" if n else "")


def _cache_finished(out: Path) -> bool:
    """True when `out` holds a finished feature cache (its cache.json says complete)."""
    try:
        return json.loads((out / "cache.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _expected_key(side: str, spec: str) -> str:
    """The key `csalign encode --encoder <demo encoder> --data spec --dtype fp32` gives, computed from the weight
    files' hashes: neither encoder is loaded (about half of a rerun's time went to loading both only to
    compare this key)."""
    from csaligner.data.cache import cache_key
    from csaligner.data.datasets import resolve_dataset
    from csaligner.data.encode import EncodeConfig, cache_key_fields
    from csaligner.encoders.efficientnet import LITE0_PREPROCESS, lite0_id
    from csaligner.encoders.text import MINILM_MAX_LENGTH, minilm_id

    manifest, cfg = resolve_dataset(spec), EncodeConfig(dtype="fp32")
    if side == "image":
        return cache_key(cache_key_fields(lite0_id(), LITE0_PREPROCESS.describe(), None, manifest, ["image"], cfg))
    return cache_key(cache_key_fields(minilm_id(), None, MINILM_MAX_LENGTH, manifest, ["text"], cfg))


def _reuse_without_loading(out: Path, side: str, spec: str) -> bool:
    """Open the finished cache `out` against its expected key (checksums verified, as `csalign encode` does).
    False when it does not open so: `csalign encode` then loads the encoder and says what is wrong."""
    from csaligner.data.cache import FeatureCache
    from csaligner.encoders.base import EncoderUnavailableError

    try:
        FeatureCache.open(out, expected_key=_expected_key(side, spec))
    except (ValueError, OSError, EncoderUnavailableError):
        return False
    return True


def encode_caches(s: FlickrDemoSettings) -> dict[str, Path]:
    """Encode (or reuse) the four caches; returns {"train_image", "train_text", "dev_image", "dev_text"}."""
    paths = {}
    for split, n in (("train", s.train_images), ("dev", s.dev_images)):
        for side, encoder in (("image", "efficientnet-lite0"), ("text", "minilm")):
            out = s.cache_dir / f"{_spec(split, n).replace(':', '-')}-{encoder}"
            args = ["encode", "--encoder", encoder, "--data", _spec(split, n), "--out", str(out), "--dtype", "fp32"]
            if _cache_finished(out):  # a rerun only checks and reuses it: no progress bars to show for that
                if _reuse_without_loading(out, side, _spec(split, n)):
                    print(f"cache: {out} finished, key checked without loading {encoder}; reused")
                    paths[f"{split}_{side}"] = out
                    continue
                args.append("--quiet")
            rc = cli_main(args)
            if rc != 0:  # `csalign encode` printed why just above
                raise ValueError(f"encoding {_spec(split, n)} with {encoder} failed (exit {rc}; its error is above)")
            paths[f"{split}_{side}"] = out
    return paths


def demo_overrides(s: FlickrDemoSettings, caches: dict[str, Path], objective: str) -> list[str]:
    """Run-config overrides shared by both runs; only the objective (and the CS term's lam, sigma) differ."""
    cs_term = [f"loss.lam={s.lam}", f"loss.sigma={s.sigma}"] if objective == "cs_aligner" else []  # infonce: none
    return [
        f"data.image_cache={caches['train_image']}",
        f"data.text_cache={caches['train_text']}",
        "model.image={kind: mlp}",
        "model.text={kind: mlp}",
        "model.out_dim=512",
        f"loss.objective={objective}",
        *cs_term,
        f"train.epochs={s.epochs}",
        f"train.batch_size={s.batch_size}",
        f"train.lr={s.lr}",
        f"train.seed={s.seed}",
        "train.tensorboard=false",
        f"train.out_dir={s.out_dir / objective}",
        "train.resume=auto",  # an interrupted run of the same settings continues (see `_prepare_run`)
    ]


def config_changes(run_dir: Path, config: Any) -> list[str]:
    """ "section.key: old -> new" for each setting of `config` (a `RunConfig`) that differs from the run
    saved in run_dir (its config.yaml); [] when they agree. Bookkeeping that a resumed run may change
    (`RESUME_MAY_CHANGE`) does not count, but the caches do: their names carry the subset sizes."""
    import yaml

    from csaligner.train.checkpoint import RESUME_MAY_CHANGE
    from csaligner.train.checkpoint import config_changes as diff
    from csaligner.train.overrides import read_yaml, to_dict
    from csaligner.train.stored_config import drop_ignored_settings

    try:
        saved = read_yaml(run_dir / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(
            f"{run_dir / 'config.yaml'} could not be read ({err}); remove {run_dir} to train that run again"
        ) from err
    loaded = drop_ignored_settings(saved)  # saved by an earlier version with settings it ignored: the same run
    return diff(loaded, to_dict(config), RESUME_MAY_CHANGE - {"data.image_cache", "data.text_cache"}, as_stored=saved)


def _prepare_run(name: str, run_dir: Path, config: Any) -> bool:
    """True when run_dir already holds this config's finished run. A run dir from other settings (finished
    or not) is removed, saying what changed; one from the same settings is left to resume."""
    if not (run_dir / "config.yaml").is_file():
        return False
    changes = config_changes(run_dir, config)
    if not changes:
        return (run_dir / "summary.json").is_file()
    print(f"\n== {name}: {run_dir} was trained with other settings, training again ==")
    print("   " + "\n   ".join(changes))
    shutil.rmtree(run_dir)
    return False


def run_flickr_demo(s: FlickrDemoSettings = FlickrDemoSettings()) -> dict[str, dict[str, float]]:
    """Encode, train both objectives, evaluate on dev; returns {run name: metrics}."""
    from csaligner.data import load_paired_features
    from csaligner.eval.cli import HEADLINE, report_figures
    from csaligner.eval.evaluate import evaluate_run
    from csaligner.eval.report import ReportSection, write_report
    from csaligner.train import load_config, train

    caches = encode_caches(s)
    runs = {}
    for name, objective in (("InfoNCE only", "infonce"), ("CS-Aligner", "cs_aligner")):
        run_dir = s.out_dir / objective
        config = load_config(None, demo_overrides(s, caches, objective))
        if not _prepare_run(name, run_dir, config):
            print(f"\n== training {name} ==")
            train(config, report=print)  # the data counts line
        runs[name] = run_dir
    dev = load_paired_features(caches["dev_image"], caches["dev_text"])
    n_train = load_paired_features(caches["train_image"], caches["train_text"]).num_images
    results = {name: evaluate_run(run, dev, sigma=s.sigma) for name, run in runs.items()}
    figures = report_figures(runs, dev, s.out_dir)
    figures.append(write_preview(runs, dev, s.out_dir))
    table: dict[str, dict[str, float | list[float]]] = {
        n: {k: m[k] for k in HEADLINE if k in m} for n, m in results.items()
    }
    text = (
        f"Frozen EfficientNet-Lite0 (images) and MiniLM (captions); MLP adapters to 512-d trained on "
        f"{n_train} Flickr8k train images x 5 captions, evaluated on {dev.num_images} dev "
        f"images / {dev.num_texts} captions. Seed {s.seed}, {s.epochs} epochs, batch {min(s.batch_size, n_train)}, "
        f"lr {s.lr}, CS-Aligner lambda {s.lam}, sigma {s.sigma}. Recall in %."
    )
    write_report(s.out_dir, "csaligner demo: Flickr8k", [ReportSection("Flickr8k dev", text, table, figures)])
    (s.out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    _print_table(table)
    print(f"\nreport: {s.out_dir / 'report.md'}")
    return results


def write_preview(runs: dict[str, Path], dev: PairedFeatures, out_dir: Path, n_prompts: int = 4, k: int = 5) -> Path:
    """Top-k dev images for a few dev captions, one block per run (PNG grid + HTML)."""
    from csaligner.data import data_root
    from csaligner.decode.preview_runs import preview_runs

    t2i = dev.text_to_image
    rows = list(range(0, t2i.numel(), max(1, t2i.numel() // n_prompts)))[:n_prompts]
    paths = [data_root() / "flickr8k" / "images" / i for i in dev.image_ids]
    truth = {p: {int(t2i[r])} for p, r in enumerate(rows)}
    prompts = [dev.captions[r] for r in rows]
    png, _ = preview_runs(runs, dev.image, paths, prompts, out_dir / "preview", k, dev.text[rows], truth)
    return Path(png)


def _print_table(table: dict[str, dict[str, float | list[float]]]) -> None:
    cols = ("i2t_R@1", "t2i_R@1", "rsum", "centroid_distance", "cs_divergence", "linear_separability")
    print("\n" + f"{'run':<16}" + "".join(f"{c:>20}" for c in cols))
    for name, m in table.items():
        print(f"{name:<16}" + "".join(f"{float(m[c]):>20.3f}" for c in cols))  # type: ignore[arg-type]
