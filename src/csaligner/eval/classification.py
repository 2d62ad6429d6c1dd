"""Zero-shot and few-shot image classification on frozen (or aligned) embeddings.

Accuracies are percentages (0-100). Zero-shot scores each image against one text embedding per
class (several prompts per class are averaged after normalisation, CLIP's prompt ensembling).
Few-shot draws k labelled training images per class for each seed and classifies the test set
with a nearest class mean ("prototype") or a multinomial logistic regression ("logreg").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, TypedDict

import torch
from torch import Tensor

from csaligner._validation import check_features, check_same_dim
from csaligner.eval._common import check_chunk_size, check_labels, compute_dtype, mean_std, unit_rows
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


def _entries(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a file's non-blank lines that are not "#" comments, stripped."""
    try:
        # utf-8-sig: Notepad and PowerShell 5 open a UTF-8 file with a byte-order mark, no part of the first line
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from err
    stripped = ((n, line.strip()) for n, line in enumerate(lines, 1))
    return [(n, text) for n, text in stripped if text and not text.startswith("#")]


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
    entries = _entries(path)
    if not entries:
        raise ValueError(f'{path} holds no template; write one per line, e.g. "a photo of a {{}}."')
    for n, template in entries:
        if template.count("{}") != 1:
            raise ValueError(
                f'{path} line {n}: {template!r} has {template.count("{}")} "{{}}"; each template needs exactly '
                'one, where the class name goes (e.g. "a photo of a {}.")'
            )
    return tuple(template for _, template in entries)


class RenameItem(NamedTuple):
    """One FOLDER=NAME item of `--class-names`, before it is matched with the class folders."""

    at: str
    """Where it was written, for errors: "--class-names item 2" or "names.txt line 3"."""
    text: str
    readings: tuple[tuple[str, str], ...]
    """Every (folder, name) it can mean, escapes read: one per "=" (not one written "\\=") with text on
    both sides."""


LITERAL_BACKSLASH, LITERAL_EQUALS = "\\\\", "\\="
"""How a FOLDER=NAME item writes a backslash, and an "=" that belongs to the folder or the name rather
than separating them. A backslash before anything else, or at the end, is an error."""


def _escape(text: str) -> str:
    return text.replace("\\", LITERAL_BACKSLASH).replace("=", LITERAL_EQUALS)


def escape_class_rename(folder: str, name: str) -> str:
    """The FOLDER=NAME item that renames exactly `folder` to `name` (each backslash of either written
    "\\\\", each "=" written "\\=")."""
    return f"{_escape(folder)}={_escape(name)}"


def _shown(text: str) -> str:
    """An item in an error as it was written: in quotes, its backslashes not doubled as repr() would."""
    return f"'{text}'"


def _unescape(at: str, text: str) -> list[tuple[str, bool]]:
    """The characters of an item, each with whether a backslash escaped it ("\\\\" -> "\\", "\\=" -> "=").

    Raises:
        ValueError: a backslash before any other character or at the end, with the item as it should read.
    """
    chars: list[tuple[str, bool]] = []
    i = 0
    while i < len(text):
        if text[i] != "\\":
            chars.append((text[i], False))
            i += 1
        elif text[i + 1 : i + 2] in ("\\", "="):
            chars.append((text[i + 1], True))
            i += 2
        else:
            raise _bad_escape(at, text, i)
    return chars


def _bad_escape(at: str, text: str, i: int) -> ValueError:
    """The error for the lone backslash at text[i], with the item each lone backslash doubled."""
    fixed, j = "", 0
    while j < len(text):
        pair = text[j : j + 2]
        step = 2 if pair in (LITERAL_BACKSLASH, LITERAL_EQUALS) else 1
        fixed += LITERAL_BACKSLASH if pair[:1] == "\\" and step == 1 else text[j : j + step]
        j += step
    what = "ends in a lone backslash" if i == len(text) - 1 else f"has a backslash before {text[i + 1]!r}"
    comma = " (a name holding a comma needs a file)" if at.startswith("--") and i == len(text) - 1 else ""
    return ValueError(
        f'{at}: {_shown(text)} {what}{comma}; a backslash escapes only a backslash or an "=": write one that is '
        f'part of a folder or a name as {LITERAL_BACKSLASH} (here {_shown(fixed)}) and such an "=" as {LITERAL_EQUALS}'
    )


def _readings(at: str, text: str) -> tuple[tuple[str, str], ...]:
    """(folder, name) for each "=" of `text` not written "\\=" whose two sides are not blank (escapes read,
    sides stripped)."""
    chars = _unescape(at, text)
    out = []
    for i, (char, escaped) in enumerate(chars):
        if char == "=" and not escaped:
            folder, name = ("".join(c for c, _ in side).strip() for side in (chars[:i], chars[i + 1 :]))
            if folder and name:
                out.append((folder, name))
    return tuple(out)


def _not_a_pair(at: str, text: str) -> ValueError:
    """The error for an item with no "=" between two non-blank sides; when its "=" is escaped, how to
    write a folder or name that ends in a backslash instead."""
    hint, i = "", 0
    while i < len(text) - 2 and text[i : i + 2] != LITERAL_EQUALS:  # the first escaped "=" with text after it
        i += 2 if text[i] == "\\" else 1  # every backslash starts a two-character escape (checked before)
    if text[i : i + 2] == LITERAL_EQUALS and i < len(text) - 2:
        written = text[:i] + LITERAL_BACKSLASH + "=" + text[i + 2 :]
        hint = (
            f' (its "=" is written {LITERAL_EQUALS}, an "=" inside a folder or a name; for a folder or name ending '
            f"in a backslash write {LITERAL_BACKSLASH}: {_shown(written)})"
        )
    return ValueError(
        f"{at}: {_shown(text)} is not FOLDER=NAME{hint}; write pairs like roses=rose (in a file one a line, "
        "on the command line comma-separated: roses=rose,tulips=tulip; a name holding a comma needs a file)"
    )


def read_class_renames(spec: str | Path) -> list[RenameItem]:
    """The FOLDER=NAME items of a file (one a line) or a comma-separated string, checked as text only.

    An item may read several ways when a folder or a name holds "=" (a=b=c: folder "a" or "a=b");
    `parse_class_renames` picks the reading that names a class folder.

    Raises:
        ValueError: an item with no "=" between two non-blank sides or with a backslash that escapes
            nothing, an item that can only rename a folder an earlier one renames, or no item at all.
    """
    path = Path(spec)
    if path.is_file():
        items = [(f"{path} line {n}", text) for n, text in _entries(path)]
    elif "=" not in str(spec):
        raise ValueError(
            f"--class-names {_shown(str(spec))} is neither a file nor FOLDER=NAME pairs; pass e.g. "
            "roses=rose,tulips=tulip or a file with one roses=rose pair a line"
        )
    else:
        items = [(f"--class-names item {i}", text.strip()) for i, text in enumerate(str(spec).split(","), 1)]
    out: list[RenameItem] = []
    certain: dict[str, str] = {}  # {folder: name} of the items that can be read one way only
    for at, text in items:
        readings = _readings(at, text)
        if not readings:
            raise _not_a_pair(at, text)
        if len(readings) == 1:  # an item that can mean two folders is checked once they are known
            folder, name = readings[0]
            if folder in certain:
                raise ValueError(f"{at}: class {folder!r} is renamed twice ({certain[folder]!r} and {name!r})")
            certain[folder] = name
        out.append(RenameItem(at, text, readings))
    if not out:  # only a file can be empty: every comma-separated item is checked above
        raise ValueError(f"{path} names no class; write FOLDER=NAME pairs such as roses=rose")
    return out


def parse_class_renames(spec: str | Path, classes: Sequence[str] | None = None) -> dict[str, str]:
    """`folder=prompt name` pairs from a file (one a line) or a comma-separated string -> {folder: name}.

    A file's blank lines and "#" lines are skipped. A folder or a name may hold "=": an item is split
    at the "=" whose left side is one of `classes` (so a=b=c renames folder "a=b" to "c" when there is
    no folder "a"). Where several splits name a class folder, write each "=" that belongs to a folder
    or a name as "\\=" (a\\=b=c renames "a=b"; a=b\\=c renames "a" to "b=c"). Without `classes`, an
    item is split at its first such "=". A backslash escapes: "\\=" is an "=" and "\\\\" a backslash of
    the folder or the name (a\\\\=b renames folder "a\\" to "b"); `escape_class_rename` writes any pair.

    Raises:
        ValueError: a pair without "=", with an empty side, a backslash before anything but a backslash
            or "=" (or at the end), a folder named twice, a folder that is not among `classes`, or an
            item that could rename two of `classes`.
    """
    renames: dict[str, str] = {}
    for item in read_class_renames(spec):
        known = item.readings if classes is None else tuple(r for r in item.readings if r[0] in classes)
        if len(known) > 1 and classes is not None:
            raise _ambiguous_rename(item, known)
        folder, name = known[0] if known else item.readings[0]  # none known: reported below as not a class
        if folder in renames:
            raise ValueError(f"{item.at}: class {folder!r} is renamed twice ({renames[folder]!r} and {name!r})")
        renames[folder] = name
    if classes is not None:
        _check_known(renames, classes)
    return renames


def _ambiguous_rename(item: RenameItem, readings: Sequence[tuple[str, str]]) -> ValueError:
    """The error for an item that could rename several class folders, with the unambiguous way to write each."""
    options = " or ".join(f"{folder!r} (as {name!r})" for folder, name in readings)
    written = [escape_class_rename(folder, name) for folder, name in readings]
    which = ", ".join(f"{text} for {folder!r}" for text, (folder, _) in zip(written, readings, strict=True))
    shell = f" (in single quotes for the shell: --class-names '{written[0]}')" if item.at.startswith("--") else ""
    return ValueError(
        f'{item.at}: {_shown(item.text)} could rename class {options}; write each "=" that is part of a folder or '
        f'a name as "{LITERAL_EQUALS}" to say which: {which}{shell}'
    )


def _check_known(renames: Mapping[str, str], class_names: Sequence[str]) -> None:
    unknown = [k for k in renames if k not in class_names]
    if unknown:
        raise ValueError(f"class names {unknown} are not classes of this data; the classes are {list(class_names)}")


def prompt_class_names(class_names: Sequence[str], renames: Mapping[str, str]) -> list[str]:
    """The name each class is prompted with: `renames[folder]`, or the folder name when not renamed.

    Raises:
        ValueError: a renamed class is not among `class_names`, or two classes would get the same name
            (their prompts would be identical and zero-shot could not tell them apart).
    """
    _check_known(renames, class_names)
    names = [renames.get(c, c) for c in class_names]
    seen: dict[str, str] = {}
    for folder, name in zip(class_names, names, strict=True):
        if name in seen:
            raise ValueError(
                f"classes {seen[name]!r} and {folder!r} would both be prompted as {name!r}; zero-shot could not "
                "tell them apart, so give them distinct names"
            )
        seen[name] = folder
    return names


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
    labels = check_labels("labels", labels.to(image_emb.device), n, num_classes=c)
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
    train_raw = check_labels("train_labels", train_labels.to(device), train_emb.shape[0])
    classes, train_y = torch.unique(train_raw, return_inverse=True)  # sorted class ids
    test_raw = check_labels("test_labels", test_labels.to(device), test_emb.shape[0])
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
