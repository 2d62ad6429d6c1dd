"""Zero-shot and few-shot image classification on frozen (or aligned) embeddings.

Accuracies are percentages (0-100). Zero-shot scores each image against one text embedding per
class (several prompts per class are averaged after normalisation, CLIP's prompt ensembling).
Few-shot draws k labelled training images per class for each seed and classifies the test set
with a nearest class mean ("prototype") or a multinomial logistic regression ("logreg").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypedDict

import torch
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import check_features, check_same_dim
from csaligner.eval._common import check_chunk_size, check_labels, compute_dtype, mean_std, text_file_entries, unit_rows
from csaligner.eval._logreg import fit_logistic_regression

# CLIP's 7-template ImageNet ensemble (Radford et al. 2021; openai/CLIP
# notebooks/Prompt_Engineering_for_ImageNet.ipynb, the 7 templates selected there).
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# CLIP's Flowers102 prompt (Radford et al. 2021; openai/CLIP data/prompts.md, "Flowers102").
FLOWERS102_TEMPLATES: tuple[str, ...] = ("a photo of a {}, a type of flower.",)
DEFAULT_TEMPLATES = CLIP_IMAGENET_TEMPLATES
TEMPLATE_PRESETS: dict[str, tuple[str, ...]] = {
    "clip-imagenet-7": CLIP_IMAGENET_TEMPLATES,
    "flowers102": FLOWERS102_TEMPLATES,
}
"""Named template sets `csalign eval --templates NAME` accepts; "clip-imagenet-7" is the default."""

FewShotMethod = Literal["prototype", "logreg"]


class ZeroShotResult(TypedDict):
    """Zero-shot accuracies in percent."""

    top1: float
    top5: float  # 100.0 when there are 5 classes or fewer
    mean_per_class: float  # mean over classes that have test images (balanced accuracy)
    per_class: list[float]  # (C,) top-1 accuracy per class; NaN for a class with no test image


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """Fill every template with every class name.

    Args:
        class_names: C names, used as given (e.g. "pink primrose").
        templates: P strings, each with one "{}" where the name goes.

    Returns:
        C lists of P prompts; encode them into a (C, P, D) tensor for `zero_shot_accuracy`.
    """
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"class_names must be a non-empty sequence of strings, got {class_names!r}")
    if isinstance(templates, str) or not templates:
        raise ValueError(f'templates must be a non-empty sequence like ("a photo of a {{}}.",), got {templates!r}')
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f'each template needs exactly one "{{}}" for the class name; these do not: {bad}')
    return [[t.replace("{}", name) for t in templates] for name in class_names]


def load_templates(spec: str | Path) -> tuple[str, ...]:
    """A `TEMPLATE_PRESETS` name, or a text file with one template per line, -> the templates.

    In a file, blank lines and lines starting with "#" are skipped and each template is stripped.

    Raises:
        ValueError: `spec` is neither a preset nor a file, the file has no template, or a line has
            no or several "{}" (named by its line number).
    """
    if str(spec) in TEMPLATE_PRESETS:
        return TEMPLATE_PRESETS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"templates {str(spec)!r} are neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file; pass a "
            'preset name or a text file with one template per line, e.g. "a photo of a {}."'
        )
    entries = text_file_entries(path)
    if not entries:
        raise ValueError(f'{path} holds no template; write one per line, e.g. "a photo of a {{}}."')
    for n, template in entries:
        if template.count("{}") != 1:
            raise ValueError(
                f'{path} line {n}: {template!r} has {template.count("{}")} "{{}}"; each template needs exactly '
                'one, where the class name goes (e.g. "a photo of a {}.")'
            )
    return tuple(template for _, template in entries)


@autocast_off
def class_embeddings(class_text_emb: Tensor) -> Tensor:
    """(C, D) or (C, P, D) text embeddings -> (C, D) unit-norm class weights (prompts averaged)."""
    if not isinstance(class_text_emb, Tensor) or class_text_emb.dim() not in (2, 3):
        shape = tuple(class_text_emb.shape) if isinstance(class_text_emb, Tensor) else type(class_text_emb).__name__
        raise ValueError(f"class_text_emb must be a (C, D) or (C, P, D) tensor (P prompts per class), got {shape}")
    if class_text_emb.dim() == 3:
        check_features("class_text_emb", class_text_emb, ndim=3)
        prompts = unit_rows(class_text_emb, compute_dtype(class_text_emb))  # (C, P, D) each prompt unit-norm
        return unit_rows(prompts.mean(1), prompts.dtype)
    check_features("class_text_emb", class_text_emb)
    return unit_rows(class_text_emb, compute_dtype(class_text_emb))


def _correct_at(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """(n, C) scores -> (n,) bool: fewer than k other classes score >= the true class (ties count against)."""
    true = scores.gather(1, labels.unsqueeze(1))
    return (scores >= true).sum(1) - 1 < k


@autocast_off
def zero_shot_accuracy(
    image_emb: Tensor, class_text_emb: Tensor, labels: Tensor, chunk_size: int = 4096
) -> ZeroShotResult:
    """Classify each image as the class whose (prompt-averaged) text embedding is most cosine-similar.

    Args:
        image_emb: (N, D) image embeddings.
        class_text_emb: (C, D) one embedding per class, or (C, P, D) with P prompts per class.
        labels: (N,) integer class of each image in [0, C).
        chunk_size: images scored per (chunk, C) block.

    Returns:
        `ZeroShotResult`: "top1", "top5", "mean_per_class" and "per_class" (percent). A true class
        tied with another counts as wrong.
    """
    check_features("image_emb", image_emb)
    classes = class_embeddings(class_text_emb)
    check_same_dim("image_emb", image_emb, "class_text_emb", classes)
    n, c = image_emb.shape[0], classes.shape[0]
    labels = check_labels("labels", labels, n, num_classes=c, device=image_emb.device)
    dtype = compute_dtype(image_emb, classes)
    image, classes = unit_rows(image_emb, dtype), classes.to(image_emb.device, dtype)
    top1 = torch.zeros(n, dtype=torch.bool, device=image.device)
    top5 = torch.zeros_like(top1)
    chunk_size = check_chunk_size(chunk_size)
    for start in range(0, n, chunk_size):
        scores = image[start : start + chunk_size] @ classes.T  # (chunk, C) cosine similarities
        lab = labels[start : start + chunk_size]
        top1[start : start + chunk_size] = _correct_at(scores, lab, 1)
        top5[start : start + chunk_size] = _correct_at(scores, lab, 5)
    counts = torch.bincount(labels, minlength=c).double()
    hits = torch.bincount(labels, weights=top1.double(), minlength=c)
    per_class = torch.where(counts > 0, 100.0 * hits / counts.clamp_min(1), torch.nan)
    return ZeroShotResult(
        top1=100.0 * float(top1.double().mean()),
        top5=100.0 * float(top5.double().mean()),
        mean_per_class=float(per_class[counts > 0].mean()),
        per_class=per_class.tolist(),
    )


def _classify(
    method: FewShotMethod, train: Tensor, train_y: Tensor, test: Tensor, num_classes: int, l2: float, steps: int
) -> Tensor:
    """Unit-norm (n, D) train features with labels -> (m,) predictions for unit-norm test features."""
    if method == "prototype":
        sums = torch.zeros(num_classes, train.shape[1], dtype=train.dtype, device=train.device)
        prototypes = unit_rows(sums.index_add_(0, train_y, train), train.dtype)  # (C, D) normalised class means
        return (test @ prototypes.T).argmax(1)
    return fit_logistic_regression(train, train_y, num_classes, l2=l2, steps=steps).predict(test).to(test.device)


def _relabel(
    train_labels: Tensor, test_labels: Tensor, train_emb: Tensor, test_emb: Tensor, k_max: int
) -> tuple[Tensor, Tensor, int]:
    """Map the training classes to 0..C-1 and check every class can give k_max shots."""
    device = train_emb.device
    train_raw = check_labels("train_labels", train_labels, train_emb.shape[0], device=device)
    classes, train_y = torch.unique(train_raw, return_inverse=True)  # sorted class ids
    test_raw = check_labels("test_labels", test_labels, test_emb.shape[0], device=device)
    unseen = sorted(set(test_raw.unique().tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(
            f"test_labels contain {len(unseen)} class(es) with no training row ({unseen[:10]}); "
            "few-shot needs training examples of every test class"
        )
    counts = torch.bincount(train_y, minlength=classes.numel())
    if int(counts.min()) < k_max:
        short = classes[counts < k_max].tolist()
        raise ValueError(
            f"{len(short)} class(es) have fewer than {k_max} training rows (labels {short[:10]}, smallest has "
            f"{int(counts.min())}); lower max(shots) or add training data"
        )
    return train_y, torch.searchsorted(classes, test_raw.contiguous()), classes.numel()


@autocast_off
def few_shot_accuracy(
    train_emb: Tensor,
    train_labels: Tensor,
    test_emb: Tensor,
    test_labels: Tensor,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    method: FewShotMethod = "prototype",
    *,
    l2: float = 1e-3,
    steps: int = 100,
) -> dict[str, float]:
    """k-shot accuracy on the test set, averaged over seeds, for each k in `shots`.

    For each seed, every class's training rows are shuffled once and the first k are used, so the
    k-shot set contains the smaller-k sets (less seed noise along a shots curve).

    Args:
        train_emb: (N, D) embeddings to draw the shots from.
        train_labels: (N,) integer classes; every class present here is a candidate.
        test_emb: (M, D) embeddings to classify.
        test_labels: (M,) integer classes, each of which must occur in train_labels.
        shots: k values; every class needs at least max(shots) training rows.
        seeds: one run per seed.
        method: "prototype" (nearest normalised class mean, cosine) or "logreg" (multinomial
            logistic regression on normalised features, `steps` L-BFGS steps, penalty `l2`).
        l2: L2 penalty of "logreg".
        steps: L-BFGS iterations of "logreg".

    Returns:
        {"1-shot": mean accuracy, "1-shot_std": std over seeds (ddof=1, 0 for one seed), ...}, percent.
    """
    check_features("train_emb", train_emb)
    check_features("test_emb", test_emb)
    check_same_dim("train_emb", train_emb, "test_emb", test_emb)
    if method not in ("prototype", "logreg"):
        raise ValueError(f'method must be "prototype" or "logreg", got {method!r}')
    if not shots or any(int(k) < 1 for k in shots) or not seeds:
        raise ValueError(f"shots must be integers >= 1 and seeds non-empty, got shots={shots!r}, seeds={seeds!r}")
    train_y, test_y, num_classes = _relabel(train_labels, test_labels, train_emb, test_emb, max(map(int, shots)))
    dtype = compute_dtype(train_emb, test_emb)
    train, test = unit_rows(train_emb, dtype), unit_rows(test_emb.to(train_emb.device), dtype)
    members = [(train_y == c).nonzero().flatten() for c in range(num_classes)]
    accs: dict[int, list[float]] = {int(k): [] for k in shots}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        perms = [m[torch.randperm(m.numel(), generator=gen).to(m.device)] for m in members]
        for k in accs:
            idx = torch.cat([perm[:k] for perm in perms])
            pred = _classify(method, train[idx], train_y[idx], test, num_classes, l2, steps)
            accs[k].append(100.0 * float((pred == test_y).double().mean()))
    out: dict[str, float] = {}
    for k, values in accs.items():
        out[f"{k}-shot"], out[f"{k}-shot_std"] = mean_std(values)
    return out
