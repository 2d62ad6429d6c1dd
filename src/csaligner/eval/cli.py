"""`csalign eval`: metrics, plots and a report for one or more trained runs on held-out features."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from csaligner.data.features import PairedFeatures
from csaligner.eval.class_names import escape_class_rename, parse_class_renames, prompt_class_names, read_class_renames
from csaligner.eval.classification import DEFAULT_TEMPLATES, TEMPLATE_PRESETS, load_templates
from csaligner.eval.evaluate import (
    DEFAULT_SHOTS,
    FEW_SHOT_SEEDS,
    ClassificationData,
    check_classification_encoders,
    check_run_encoders,
    evaluate_run,
    load_classification,
    shares_builtin_split,
    trained_on,
    training_warnings,
)
from csaligner.eval.plots import plot_paired_distance_hist, plot_projection
from csaligner.eval.report import MeanStd, ReportSection, Value, write_report

HEADLINE = (
    "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "centroid_distance",
    "paired_distance", "cs_divergence", "linear_separability", "t2i_frechet_distance", "t2i_paired_cosine",
    "zero_shot_top1", "few_shot_1-shot", "few_shot_16-shot",
)  # fmt: skip
"""Report-table columns; every recall that `rsum` adds up is shown, so a reader can check it."""


# How to read the columns: without it "linear_separability 0.90" or "cs_divergence 0.017" says no direction.
READING = (
    "Retrieval: recall in % (higher is better; rsum sums the six). Modality gap, lower = smaller gap: "
    "centroid_distance and paired_distance between unit-norm embeddings (0 to 2), cs_divergence "
    "(0 = the same distribution), linear_separability (held-out accuracy of an image-vs-text classifier; "
    "0.5 = indistinguishable)."
)


def headline(shots: Sequence[int] = DEFAULT_SHOTS) -> tuple[str, ...]:
    """HEADLINE with one few-shot column per k in `shots` (what `csalign eval --shots` asked for)."""
    return (*(k for k in HEADLINE if not k.startswith("few_shot_")), *(f"few_shot_{k}-shot" for k in shots))


def report_table(results: dict[str, dict[str, float]], columns: Sequence[str]) -> dict[str, dict[str, Value]]:
    """{run: {column: value}} of the columns each run has; a metric with a "<name>_std" companion (few-shot
    accuracy over `FEW_SHOT_SEEDS`) is shown as mean ± std, as RESULTS tables show seeds."""
    table: dict[str, dict[str, Value]] = {}
    for name, m in results.items():
        row: dict[str, Value] = {}
        for k in (c for c in columns if c in m):
            std = m.get(f"{k}_std")
            row[k] = m[k] if std is None else MeanStd(m[k], std, len(FEW_SHOT_SEEDS))
        table[name] = row
    return table


def report_sources(
    image_cache: str,
    text_cache: str,
    features: PairedFeatures,
    classification: ClassificationData | None = None,
    *,
    class_train_cache: str = "",
    class_test_cache: str = "",
    shots: Sequence[int] = DEFAULT_SHOTS,
    prompts: ZeroShotPrompts | None = None,
) -> dict[str, dict[str, str | int]]:
    """Which caches the report's columns came from, with their image, caption and class counts, and which
    prompt templates and class names zero-shot used."""
    sources: dict[str, dict[str, str | int]] = {
        "retrieval, gap: images": {"cache": image_cache, "images": features.num_images},
        "retrieval, gap: captions": {"cache": text_cache, "captions": features.num_texts},
    }
    if classification is not None:
        classes = len(classification.class_names)
        test_images, train_labels = classification.test_labels.numel(), classification.train_labels
        scored = "zero-shot" if train_labels is None else "zero-shot, few-shot"
        sources[f"{scored}: test"] = {"cache": class_test_cache, "images": test_images, "classes": classes}
        if train_labels is not None:
            sources["few-shot: train"] = {
                "cache": class_train_cache,
                "images": train_labels.numel(),
                "classes": classes,
                "shots": ",".join(map(str, shots)),
                "seeds": ",".join(map(str, FEW_SHOT_SEEDS)),
            }
        prompts = prompts or ZeroShotPrompts.resolve(None, None, classification.class_names)
        renames = prompts.renames.items()  # written as --class-names takes them: a folder holding "=" reads one way
        renamed = ", ".join(escape_class_rename(k, v) for k, v in renames if k != v) or "folder names"
        sources["zero-shot: prompts"] = {"templates": prompts.describe(), "class names": renamed}
    return sources


@dataclass(frozen=True)
class ZeroShotPrompts:
    """The zero-shot prompt templates and the name each class folder is prompted with, and where they came from."""

    templates: tuple[str, ...]
    source: str
    """The --templates value: a preset name or a file."""
    renames: dict[str, str]
    """{folder name: prompt name} of every class, in class order (a class not renamed maps to itself)."""

    @classmethod
    def resolve(cls, templates: str | None, class_names: str | None, classes: Sequence[str]) -> ZeroShotPrompts:
        """From the --templates and --class-names values (None: the defaults) and the data's class folders."""
        source = templates or "clip-imagenet-7"
        renames = parse_class_renames(class_names, classes) if class_names else {}
        names = prompt_class_names(classes, renames)
        return cls(load_templates(source), source, dict(zip(classes, names, strict=True)))

    @property
    def names(self) -> list[str]:
        return list(self.renames.values())

    def describe(self) -> str:
        """E.g. "clip-imagenet-7 (7 templates)"."""
        return f"{self.source} ({len(self.templates)} template{'s' * (len(self.templates) != 1)})"

    def record(self) -> dict[str, object]:
        """What metrics.json stores beside each run's zero-shot numbers."""
        return {
            "zero_shot_templates": list(self.templates),
            "zero_shot_templates_source": self.source,
            "zero_shot_class_names": dict(self.renames),
        }


def report_figures(runs: dict[str, Path], features: PairedFeatures, out_dir: Path) -> list[Path]:
    """Shared-basis 2-D projection and paired-distance histograms of every run's embeddings."""
    from csaligner.train import embed

    embedded = {name: embed(features, str(run)) for name, run in runs.items()}
    t2i = features.text_to_image
    paired = t2i >= 0
    one_caption = _first_caption_rows(t2i)
    proj = plot_projection(
        {name: (img, txt[one_caption]) for name, (img, txt) in embedded.items()}, out_dir / "projection.png"
    )
    dists = {name: (img[t2i[paired]] - txt[paired]).norm(dim=1) for name, (img, txt) in embedded.items()}
    hist = plot_paired_distance_hist(dists, out_dir / "paired_distance.png")
    return [proj, hist]


def _first_caption_rows(t2i: Tensor) -> Tensor:
    """(N,) the row of the first caption of every image, so projection points pair one to one."""
    first = torch.full((int(t2i.max()) + 1,), -1, dtype=torch.long)
    for row in range(t2i.numel() - 1, -1, -1):
        if t2i[row] >= 0:
            first[t2i[row]] = row
    return first[first >= 0]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate trained runs: retrieval, modality gap, classification, report",
        description="Evaluate trained runs on held-out feature caches: image-text retrieval (R@1/5/10, rsum) and "
        "modality-gap metrics, plus zero- and few-shot accuracy with class-folder caches. Writes metrics.json, "
        "report.md, report.json and plots into --out.",
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        # not "[NAME=]DIR": argparse cannot wrap a usage line whose metavar holds brackets (it split the line)
        metavar="DIR|NAME=DIR",
        help="run folder (repeatable); named by its folder unless NAME= is given, and names must differ",
    )
    p.add_argument(
        "--image-cache",
        required=True,
        help="held-out image feature cache: a `csalign encode --out` folder (e.g. of flickr8k:dev)",
    )
    p.add_argument(
        "--text-cache",
        required=True,
        help="held-out text feature cache of the same data (encoded with --tokens for runs trained on tokens)",
    )
    p.add_argument(
        "--class-train-cache",
        help="class-folder image cache few-shot draws its k images per class from (an encoded folder, e.g. of "
        "flowers:train); needs --class-test-cache. Without it only zero-shot is run",
    )
    p.add_argument(
        "--class-test-cache",
        help="class-folder image cache zero- and few-shot are scored on (e.g. of flowers:test); alone, it runs "
        "zero-shot only",
    )
    p.add_argument(
        "--shots",
        type=parse_shots,
        metavar="K[,K...]",
        help="few-shot k values, comma-separated (default 1,4,16, with --class-train-cache); every class of "
        "--class-train-cache needs max(K) images",
    )
    p.add_argument(
        "--templates",
        metavar="PRESET_OR_FILE",
        help=f"zero-shot prompt templates: a preset ({', '.join(TEMPLATE_PRESETS)}; default clip-imagenet-7) "
        'or a text file with one template per line, each with one "{}" for the class name',
    )
    p.add_argument(
        "--class-names",
        metavar="FILE_OR_PAIRS",
        help="zero-shot names for class folders: FOLDER=NAME pairs, comma-separated (roses=rose,tulips=tulip) or "
        "one a line in a file; classes not named are prompted with their folder name. A folder or name may hold "
        '"=": each pair is split at the "=" after a class folder\'s name (a=b=c renames folder a=b when there is '
        'no folder a); where it could rename two folders, write each "=" inside a folder or name as \\= '
        "(a\\=b=c renames a=b, a=b\\=c renames a), in either form. A backslash always escapes: write one inside "
        "a folder or name as \\\\ (a\\\\=b renames folder a\\ to b); a backslash before anything else, or at the "
        "end, is an error. On the command line put the pairs in single quotes: --class-names 'a\\=b=c'",
    )
    p.add_argument("--sigma", type=float, default=1.0, help="kernel bandwidth of the D_CS gap metric (default 1.0)")
    p.add_argument("--out", type=Path, help="report folder (default: <first run>/eval)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from csaligner.encoders.hf_quiet import quiet_hf_libraries

    # Zero-shot loads the prompt encoder: its loading bars would land in the middle of the report; warnings stay.
    with quiet_hf_libraries(logs=False):
        return _main(args)


def parse_shots(text: str) -> tuple[int, ...]:
    """ "1,4,16" -> (1, 4, 16); argparse turns the ArgumentTypeError into a usage error."""
    try:
        shots = tuple(int(part) for part in text.split(","))
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--shots takes comma-separated integers >= 1 such as 1,4,16, got {text!r}")
    return tuple(sorted(set(shots)))


def parse_runs(specs: Sequence[str], flag: str = "--run") -> dict[str, Path]:
    """`[NAME=]DIR` specs -> {name: run folder}; the name defaults to the folder's name.

    Raises:
        FileNotFoundError: a folder is not a finished training run.
        ValueError: two runs get the same name (one would silently replace the other in the results).
    """
    runs: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        run = Path(path)
        if not run.exists():  # "not a finished run (no config.yaml)" read as if the folder were there
            raise FileNotFoundError(
                f"run folder {run} does not exist; pass the train.out_dir of a `csalign train` run"
                + (f" (the spec {spec!r} was read as NAME={name}, DIR={path})" if name else "")
            )
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{run} is not a finished training run (no config.yaml); pass a `csalign train` folder"
            )
        name = name or run.name
        if name in runs:
            raise ValueError(
                f"two runs are named {name!r} ({runs[name]} and {run}); give them distinct names with the "
                f"NAME=DIR form, e.g. {flag} {name}-1={runs[name]} {flag} {name}-2={run}"
            )
        runs[name] = run
    return runs


def check_class_flags(args: argparse.Namespace) -> None:
    """Refuse class-folder flags that would be ignored: zero-shot needs --class-test-cache, few-shot (and --shots)
    --class-train-cache as well; saying so beats a report without the columns asked for."""
    if args.class_train_cache and not args.class_test_cache:
        raise ValueError(
            f"--class-train-cache {args.class_train_cache} gives few-shot its training images, but zero- and "
            "few-shot are scored on --class-test-cache: pass it too (e.g. an encoded flowers:test)"
        )
    if args.shots and not args.class_train_cache:
        zero_shot = " (zero-shot needs only --class-test-cache)" if args.class_test_cache else ""
        raise ValueError(
            f"--shots {','.join(map(str, args.shots))} sets few-shot k, and few-shot draws its k images per class "
            f"from --class-train-cache: pass it{' and --class-test-cache' * (not args.class_test_cache)}, "
            f"or drop --shots{zero_shot}"
        )
    flags = {"--templates": args.templates, "--class-names": args.class_names}
    given = [flag for flag, value in flags.items() if value]
    if given and not args.class_test_cache:  # they would be ignored: say so rather than report no classification
        raise ValueError(
            f"{' and '.join(given)} {'shape' if len(given) > 1 else 'shapes'} the zero-shot prompts; pass "
            "--class-test-cache too (the class-folder images zero-shot is scored on; without it no classification "
            "is run)"
        )


def check_shots(data: ClassificationData, shots: Sequence[int], cache: str) -> None:
    """Fail before any run is evaluated when a class of the few-shot train set has fewer than max(shots) rows."""
    if data.train_labels is None:
        raise ValueError(f"few-shot needs a training set, and {cache!r} gave none; pass --class-train-cache")
    # every class, those without a training image included (an empty folder, or all its images unreadable)
    counts = torch.bincount(data.train_labels, minlength=len(data.class_names))
    labels = torch.arange(counts.numel())
    smallest = int(counts.min())
    names = dict(enumerate(data.class_names))  # labels are class indices
    if smallest == 0:
        empty = [names.get(int(c), int(c)) for c in labels[counts == 0]]
        raise ValueError(
            f"class(es) {empty[:5]} of {cache} have no training image, so few-shot cannot draw any; re-encode the "
            "class folders with images in every class (or without those classes)"
        )
    if max(shots) > smallest:
        short = [names.get(int(c), int(c)) for c in labels[counts < max(shots)]]
        fits = ",".join(str(k) for k in shots if k <= smallest) or "1"
        raise ValueError(
            f"--shots {','.join(map(str, shots))} needs {max(shots)} training images per class, but "
            f"{len(short)} class(es) of {cache} have fewer (e.g. {short[:5]}; the smallest has {smallest}); "
            f"pass --shots with values <= {smallest} (e.g. --shots {fits}) or a larger --class-train-cache"
        )


def eval_warnings(runs: dict[str, Path], features: PairedFeatures, image_cache: str) -> list[str]:
    """What the numbers of `runs` on `features` need said next to them: evaluation on the training data, and
    each warning `csalign train` recorded in a run's summary.json (a degenerate run's numbers are no result)."""
    warnings = []
    seen = [name for name, run in runs.items() if trained_on(run, features.meta)]
    if seen:
        warnings.append(
            f"{', '.join(seen)} {'was' if len(seen) == 1 else 'were'} trained on these very images and captions "
            f"({features.meta.get('source') or image_cache}): their retrieval and gap numbers are "
            "training-set numbers, not held-out ones. Evaluate on a cache of data the runs did not see."
        )
    for name, run in runs.items():
        part = shares_builtin_split(run, features.meta)
        if part:
            warnings.append(
                f"{name} was trained on {part}, part of the same split as the evaluated "
                f"{features.meta.get('source')}: some images and captions here are training data, so retrieval "
                "and gap numbers are partly training-set numbers. Evaluate on another split (e.g. train on "
                "flickr8k:train, evaluate on flickr8k:dev)."
            )
    for name, run in runs.items():
        warnings += [f"{name}: csalign train warned: {w}" for w in training_warnings(run)]
    return warnings


def _main(args: argparse.Namespace) -> int:
    from csaligner.data import load_paired_features

    runs = parse_runs(args.run)
    check_class_flags(args)
    args.shots = args.shots or DEFAULT_SHOTS
    # Bad template or class-name files fail before any features are read (class folders are checked later).
    if args.templates:
        load_templates(args.templates)
    if args.class_names:
        read_class_renames(args.class_names)
    features = load_paired_features(args.image_cache, args.text_cache, tokens=True)
    classification, prompts = None, None
    if args.class_test_cache:
        # The text cache's encoder encodes the prompts: its spec and id are in the features' meta, read
        # when the cache was opened above (cache_encoder_spec / cache_encoder_id would open it again).
        spec, text_id = str(features.meta["text_encoder_spec"]), str(features.meta["text_encoder"])
        classification = load_classification(args.class_train_cache, args.class_test_cache, spec, text_id)
        if args.class_train_cache:
            check_shots(classification, args.shots, args.class_train_cache)
        prompts = ZeroShotPrompts.resolve(args.templates, args.class_names, classification.class_names)
    for run in runs.values():  # refuse features from other encoders before any run is evaluated
        check_run_encoders(run, features.meta)
        if classification is not None:
            check_classification_encoders(run, classification)
    out_dir = args.out or next(iter(runs.values())) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    templates = DEFAULT_TEMPLATES if prompts is None else prompts.templates
    names = None if prompts is None else prompts.names
    results = {
        name: evaluate_run(
            run, features, classification, args.sigma, args.shots, templates=templates, prompt_names=names
        )
        for name, run in runs.items()
    }
    provenance = {} if prompts is None else prompts.record()
    (out_dir / "metrics.json").write_text(json.dumps({k: m | provenance for k, m in results.items()}, indent=2))
    figures = report_figures(runs, features, out_dir)
    text = f"{features.num_images} images, {features.num_texts} captions from {args.image_cache}. {READING}"
    if classification is not None and prompts is not None:
        text += " Zero- and few-shot: top-1 accuracy in %."
        if classification.train_labels is not None:
            seeds = ", ".join(map(str, FEW_SHOT_SEEDS))
            text += (
                f" Few-shot accuracy: mean ± sample std over {len(FEW_SHOT_SEEDS)} seeds ({seeds}) of the k training "
                "images drawn per class."
            )
        else:
            text += " Zero-shot only: few-shot needs --class-train-cache."
        quoted = "; ".join(f'"{t}"' for t in prompts.templates)
        text += f" Zero-shot prompts average {prompts.describe()}: {quoted}."
    # after the notes above: appended before them, those notes read as part of the last bold warning
    for warning in eval_warnings(runs, features, args.image_cache):
        print(f"csalign eval: warning: {warning}", file=sys.stderr)
        text += f"\n\n**Warning:** {warning}"
    sources = report_sources(
        args.image_cache, args.text_cache, features, classification,
        class_train_cache=args.class_train_cache, class_test_cache=args.class_test_cache, shots=args.shots,
        prompts=prompts,
    )  # fmt: skip
    table = report_table(results, headline(args.shots))
    section = ReportSection("Held-out evaluation", text, table, figures, sources)
    report = write_report(out_dir, "csalign eval", [section])
    print(Path(report).read_text())
    return 0
