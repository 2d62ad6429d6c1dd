"""Evaluate a trained run: retrieval, modality gap, T2I feature quality, zero/few-shot classification.

`evaluate_run` is what `csalign eval` and the demo call; it composes the pure metric functions of
this package with the run's adapters (`csaligner.train.embed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from csaligner.data.cache import FeatureCache, as_cache
from csaligner.data.features import PairedFeatures
from csaligner.encoders.base import encoder_name
from csaligner.eval.classification import DEFAULT_TEMPLATES, class_prompts, few_shot_accuracy, zero_shot_accuracy
from csaligner.eval.gap import modality_gap_metrics
from csaligner.eval.retrieval import retrieval_metrics
from csaligner.eval.t2i import t2i_metrics

DEFAULT_SHOTS = (1, 4, 16)
"""Few-shot k values `csalign eval` reports unless --shots says otherwise."""
FEW_SHOT_SEEDS = (0, 1, 2)
"""Seeds of the few-shot draws; "few_shot_{k}-shot" is their mean and "few_shot_{k}-shot_std" their std."""


@dataclass(frozen=True)
class ClassificationData:
    """Cached image features of a class-folder set (e.g. flowers) and the text encoder for prompts.

    Zero-shot needs only the test set; few-shot draws its k images per class from the train set, so
    without one (`train_features` and `train_labels` None) only zero-shot is scored.
    """

    train_features: Tensor | None
    train_labels: Tensor | None
    test_features: Tensor
    test_labels: Tensor
    class_names: list[str]
    text_encoder: str
    """`get_encoder` name of the text encoder the run was trained on (prompts are encoded with it)."""
    image_encoder: str = ""
    """Id of the encoder the cached image features came from ("" when unknown: then it is not checked)."""
    text_encoder_id: str = ""
    """Id `text_encoder` must load (the eval text cache's; "" skips the check)."""


def paired_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, sigma: float = 1.0) -> dict[str, float]:
    """Retrieval (multi-caption protocol) and modality-gap metrics of aligned embeddings."""
    out = retrieval_metrics(image_emb, text_emb, text_to_image)
    out.update(modality_gap_metrics(image_emb, text_emb, text_to_image, sigma=sigma))
    return out


def _run_config(run_dir: Path) -> dict:
    from csaligner.train.overrides import read_yaml

    return read_yaml(run_dir / "config.yaml")


def image_side_is_frozen(run_dir: str | Path) -> bool:
    """True when the run maps text into the frozen image space (image adapter "identity")."""
    return _run_config(Path(run_dir))["model"]["image"].get("kind") == "identity"


def evaluate_run(
    run_dir: str | Path,
    features: PairedFeatures,
    classification: ClassificationData | None = None,
    sigma: float = 1.0,
    shots: Sequence[int] = DEFAULT_SHOTS,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    prompt_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All metrics of one run on held-out paired features (and optionally a classification set).

    `templates` and `prompt_names` shape the zero-shot prompts (see `classification_metrics`).

    Returns:
        flat dict: retrieval ("i2t_R@1", ..., "rsum"), gap ("centroid_distance", "cs_divergence",
        "linear_separability", ...), for text-to-image-space runs "t2i_frechet_distance",
        "t2i_paired_cosine", with token features "token_cs_divergence" (`token_metrics`), and with
        `classification` "zero_shot_top1" and "few_shot_{k}-shot" (mean over `FEW_SHOT_SEEDS`) and
        "few_shot_{k}-shot_std" for each k in `shots`.

    Raises:
        ValueError: the run's text adapter reads text tokens but `features` has none (re-encode the
            text cache with --tokens).
    """
    from csaligner.train import embed

    check_run_encoders(run_dir, features.meta)
    image_raw, text_raw = embed(features, str(run_dir), normalize=False)
    image_emb, text_emb = F.normalize(image_raw, dim=-1), F.normalize(text_raw, dim=-1)
    out = paired_metrics(image_emb, text_emb, features.text_to_image, sigma)
    if image_side_is_frozen(run_dir):
        # The decoder consumes raw (unnormalised) image embeddings: compare mapped text with them.
        t2i = t2i_metrics(text_raw, features.image, features.text_to_image)
        out.update({k if k.startswith("t2i_") else f"t2i_{k}": v for k, v in t2i.items()})
    if features.image_tokens is not None and features.text_tokens is not None:
        out.update(token_metrics(run_dir, features, sigma))
    if classification is not None:
        out.update(
            classification_metrics(run_dir, classification, shots, templates=templates, class_names=prompt_names)
        )
    return out


def check_run_encoders(run_dir: str | Path, meta: dict[str, object], what: str = "eval") -> None:
    """Refuse features from other encoders than the run was trained on (where both record them).

    Same-width encoders would otherwise pass silently: the adapters run, and the numbers are wrong.

    Args:
        run_dir: the training run (its encoders.json; a run without one is not checked).
        meta: the features' provenance, with "image_encoder" / "text_encoder" ids where known.
        what: which features these are, for the message ("eval", "classification").
    """
    from csaligner.train.model import encoder_mismatches, run_encoders

    for key, trained_id, given in encoder_mismatches(str(run_dir), meta):
        side = key.split("_", 1)[0]
        spec = run_encoders(str(run_dir)).get(f"{key}_spec") or encoder_name(trained_id)
        raise ValueError(
            f"run {run_dir} was trained on {side} features from {trained_id!r}, but the {what} {side} cache "
            f"was encoded with {given!r}; encode the {what} data with the run's encoder "
            f"(csalign encode --encoder {spec} ...)"
        )


def _summary(run_dir: str | Path) -> dict[str, object]:
    """The run's summary.json, or {} (see `read_summary`)."""
    from csaligner.train.run_dir import read_summary

    return read_summary(run_dir)


def trained_on(run_dir: str | Path, meta: dict[str, object]) -> bool:
    """True when the run's summary.json records the same data (manifest hash) as the features' `meta`:
    "held-out" numbers on it would be training-set numbers. Runs from before it was recorded give False."""
    data = _summary(run_dir).get("data")
    manifest = data.get("manifest") if isinstance(data, dict) else None
    return bool(manifest) and manifest == meta.get("manifest")


def shares_builtin_split(run_dir: str | Path, meta: dict[str, object]) -> str | None:
    """The run's training data when it is another slice of the same built-in split as the features' `meta`
    (trained on "flickr8k:dev:100", evaluated on "flickr8k:dev": the first 100 images are in both), else None.
    Identical data is `trained_on`'s case; manifests and class folders are not compared."""
    from csaligner.data.datasets import BUILTIN_DATASETS

    data = _summary(run_dir).get("data")
    trained = data.get("source") if isinstance(data, dict) else None
    evaluated = meta.get("source")
    if not isinstance(trained, str) or not isinstance(evaluated, str) or trained_on(run_dir, meta):
        return None
    split = trained.split(":")[:2]
    builtin = split[0] in BUILTIN_DATASETS and split[1:] and split[1] in BUILTIN_DATASETS[split[0]]
    return trained if builtin and evaluated.split(":")[:2] == split else None


def training_warnings(run_dir: str | Path) -> list[str]:
    """The warnings `csalign train` recorded in the run's summary.json (e.g. "training went degenerate: ..."):
    numbers of such a run read as results unless the report repeats them. [] for runs without any."""
    recorded = _summary(run_dir).get("warnings")
    return [str(w) for w in recorded] if isinstance(recorded, list) else []


def check_classification_encoders(run_dir: str | Path, data: ClassificationData) -> None:
    """Refuse class caches from another image encoder, or prompts for another text encoder, than the run's.

    Prompts are encoded live with `data.text_encoder`: its id is compared where known (and checked again
    when it loads), else its registered name.
    """
    from csaligner.train.model import run_encoders

    check_run_encoders(run_dir, {"image_encoder": data.image_encoder}, "classification")
    trained = run_encoders(str(run_dir)).get("text_encoder")
    if not trained or not data.text_encoder:
        return
    if data.text_encoder_id:
        same = data.text_encoder_id == trained
    else:
        same = data.text_encoder.split(":", 1)[0] == encoder_name(trained)
    if not same:
        used = f"{data.text_encoder!r}" + (f" ({data.text_encoder_id!r})" if data.text_encoder_id else "")
        raise ValueError(
            f"run {run_dir} was trained on text features from {trained!r}, but the classification prompts would "
            f"be encoded with {used}; pass the run's text encoder ({encoder_name(trained)!r}), "
            "e.g. a --text-cache encoded with it"
        )


@torch.no_grad()
def token_metrics(
    run_dir: str | Path, features: PairedFeatures, sigma: float = 1.0, batch_size: int = 256
) -> dict[str, float]:
    """Held-out token-level D_CS: {"token_cs_divergence": mean over captioned images}.

    Per image, D_CS between its vision tokens and the word tokens of its first caption, both mapped
    token by token through the run's adapters and L2-normalised, exactly as the token-level training
    term (`loss.token_lam`) sees them. Empty when the features have no tokens or their token dims
    differ from the pooled dims the adapters take (e.g. CLIP towers' hidden states).
    """
    from csaligner.losses import token_cs_divergence
    from csaligner.train.model import load_adapters, tokenwise

    it, tt = features.image_tokens, features.text_tokens
    if it is None or tt is None or it.shape[-1] != features.image.shape[-1] or tt.shape[-1] != features.text.shape[-1]:
        return {}
    first = features.first_captions()
    images = (first >= 0).nonzero().flatten()
    if images.numel() == 0:
        return {}
    adapters = load_adapters(str(run_dir), "cpu")
    values = []
    for rows in images.split(batch_size):
        caps = first[rows]
        x, y = tokenwise(adapters.image, it[rows].float()), tokenwise(adapters.text, tt[caps].float())
        vm = None if features.image_token_mask is None else features.image_token_mask[rows]
        tm = None if features.text_token_mask is None else features.text_token_mask[caps]
        x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
        values.append(token_cs_divergence(x, y, vm, tm, sigma=sigma, reduction="none"))
    return {"token_cs_divergence": float(torch.cat(values).mean())}


def classification_metrics(
    run_dir: str | Path,
    data: ClassificationData,
    shots: Sequence[int] = DEFAULT_SHOTS,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Zero-shot (class-name prompts through the run's text adapter) and prototype few-shot accuracy.

    Few-shot is scored only when `data` has a train set (`shots` is ignored without one). Prompts are
    encoded with `data.text_encoder`, with token states when the run's text adapter reads them (as it
    was trained), so token-conditioned runs are scored as they would be used.

    Args:
        run_dir: the training run whose adapters map the features.
        data: class-folder features and the prompt text encoder (`load_classification`).
        shots: few-shot k values.
        templates: prompt templates, each with one "{}" for the class name; their embeddings are
            averaged per class (default CLIP's 7-template ensemble; e.g. a dataset's own template
            such as ("a photo of a {}, a type of flower.",)).
        class_names: the name each class is prompted with, in `data.class_names` order (default the
            class-folder names themselves; `prompt_class_names` builds them from renames such as
            {"roses": "rose"}).
    """
    from csaligner.train.embed import apply_adapter, embed_texts
    from csaligner.train.model import load_adapters

    check_classification_encoders(run_dir, data)
    adapters = load_adapters(str(run_dir), "cpu")
    names = data.class_names if class_names is None else list(class_names)
    if len(names) != len(data.class_names):
        raise ValueError(
            f"class_names has {len(names)} names for {len(data.class_names)} classes ({data.class_names}); "
            "give one per class, in that order"
        )
    prompts = class_prompts(names, templates)  # C lists of P prompts
    flat = [p for per_class in prompts for p in per_class]
    expect_id = data.text_encoder_id or None
    class_text = F.normalize(embed_texts(adapters, run_dir, flat, data.text_encoder, expect_id=expect_id), dim=-1)
    class_text = class_text.reshape(len(prompts), len(prompts[0]), -1)
    test_img = F.normalize(apply_adapter(adapters.image, data.test_features), dim=-1)
    zs = zero_shot_accuracy(test_img, class_text, data.test_labels)
    out = {"zero_shot_top1": float(zs["top1"]), "zero_shot_mean_per_class": float(zs["mean_per_class"])}
    if data.train_features is None or data.train_labels is None:  # zero-shot only: no images to draw shots from
        return out
    train_img = F.normalize(apply_adapter(adapters.image, data.train_features), dim=-1)
    fs = few_shot_accuracy(
        train_img, data.train_labels, test_img, data.test_labels, shots=tuple(shots), seeds=FEW_SHOT_SEEDS
    )
    out.update({f"few_shot_{k}": float(v) for k, v in fs.items()})
    return out


def load_classification(
    train_cache: str | Path | FeatureCache | None,
    test_cache: str | Path | FeatureCache,
    text_encoder: str,
    text_encoder_id: str = "",
) -> ClassificationData:
    """Read cached class-folder features (e.g. flowers:train and flowers:test) and their encoder id.

    `train_cache` None reads the test set alone: enough for zero-shot, and few-shot is then not scored.
    `text_encoder` (a `get_encoder` name) encodes the class prompts and must load `text_encoder_id`
    when that is given (e.g. both from the eval text cache: `cache_encoder_spec`, `cache_encoder_id`).
    Each cache is opened once (checksums verified), unless it is passed opened.

    Raises:
        ValueError: the two caches differ in class names or in the image encoder that made them.
    """
    from csaligner.data import load_class_features

    test = as_cache(test_cache)
    te_x, te_y, names_test = load_class_features(test)
    test_id = cache_encoder_id(test)
    if train_cache is None:
        return ClassificationData(
            None, None, te_x, te_y, names_test, text_encoder, image_encoder=test_id, text_encoder_id=text_encoder_id
        )
    train = as_cache(train_cache)
    tr_x, tr_y, names = load_class_features(train)
    if names != names_test:
        raise ValueError(f"class names differ between {train.directory} ({names}) and {test.directory} ({names_test})")
    train_id = cache_encoder_id(train)
    if train_id != test_id:
        raise ValueError(
            f"{train.directory} and {test.directory} were encoded with different image encoders ({train_id!r} vs "
            f"{test_id!r}); encode both with the encoder the runs were trained on"
        )
    return ClassificationData(
        tr_x, tr_y, te_x, te_y, names, text_encoder, image_encoder=train_id, text_encoder_id=text_encoder_id
    )


def cache_encoder_id(cache: str | Path | FeatureCache) -> str:
    """The id of the encoder a feature cache (a folder, or one opened) was built with, e.g. "minilm@4b8c5d5e-l2"."""
    return str(as_cache(cache, verify=False).key_fields["encoder"])


def cache_encoder_spec(cache: str | Path | FeatureCache) -> str:
    """How to load the encoder a feature cache (a folder, or one opened) was built with, e.g. "minilm" or
    "hf-text:/abs/dir"."""
    return as_cache(cache, verify=False).encoder_spec
