"""Readers for the shared data sets and the `--data` spec syntax.

Specs: `flickr8k:train`, `flickr8k:dev`, `flowers:train`, `flowers:test`, each optionally with a
limit (`flickr8k:train:500` = the first 500 images of the split and their captions); or a path
to a manifest file (.tsv/.csv/.jsonl/.parquet) or to a class-folder directory.
Data are read in place under the data root: $CSALIGN_DATA, else ../shared/data next to the repo.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path

from csaligner.data.delimited import read_tsv_rows
from csaligner.data.manifest import MANIFEST_SUFFIXES, ImageTextManifest, read_manifest

DATA_ENV = "CSALIGN_DATA"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
BUILTIN_DATASETS = {"flickr8k": ("train", "dev"), "flowers": ("train", "test")}
_REPO = Path(__file__).resolve().parents[3]


def data_root() -> Path:
    """The shared data folder: $CSALIGN_DATA, else <repo>/../shared/data, else ./../shared/data."""
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise FileNotFoundError(
                f"${DATA_ENV}={env!r} {what}; point it at the data folder that holds flickr8k/ and flowers/"
            )
        return root
    candidates = [_REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared/data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"data root not found (tried {tried}); set ${DATA_ENV} to the folder holding flickr8k/")


def read_flickr8k(root: str | Path, split: str) -> ImageTextManifest:
    """Flickr8k in the shared layout: images/*.jpg, captions.tsv (image, caption_id, caption), splits/<split>.txt.

    Images keep the split file's order; each image's captions are sorted by caption_id.
    """
    root = Path(root)
    split_file = root / "splits" / f"{split}.txt"
    if not split_file.is_file():
        have = sorted(p.stem for p in (root / "splits").glob("*.txt"))
        raise FileNotFoundError(f"flickr8k split {split!r} not found at {split_file}; available splits: {have}")
    names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    by_image: dict[str, list[tuple[int, str]]] = defaultdict(list)
    # Verbatim tab-separated fields: a caption opening with a quote is text, not a quoted field.
    for where, r in read_tsv_rows(root / "captions.tsv"):
        try:
            by_image[r["image"]].append((int(r["caption_id"]), r["caption"].strip()))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{where}: expected columns image, caption_id (an integer), caption; got {r}") from err
    missing = [n for n in names if n not in by_image]
    if missing:
        raise ValueError(
            f"{len(missing)} images of split {split!r} have no caption in captions.tsv, e.g. {missing[:3]}"
        )
    captions, t2i, cap_ids = [], [], []
    for i, name in enumerate(names):
        for cid, cap in sorted(by_image[name]):
            captions.append(cap)
            t2i.append(i)
            cap_ids.append(f"{name}#{cid}")
    return ImageTextManifest(
        image_ids=tuple(names),
        image_paths=tuple(str(root / "images" / n) for n in names),
        captions=tuple(captions),
        text_to_image=tuple(t2i),
        caption_ids=tuple(cap_ids),
        name=f"flickr8k:{split}",
    )


def read_coco_captions(json_path: str | Path, image_dir: str | Path) -> ImageTextManifest:
    """COCO captions JSON (images[{id, file_name}], annotations[{image_id, id, caption}]).

    Images are ordered by id; captions by annotation id within an image.
    """
    obj = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if "images" not in obj or "annotations" not in obj:
        raise ValueError(f"{json_path} is not a COCO captions file (needs 'images' and 'annotations')")
    images = sorted(obj["images"], key=lambda im: im["id"])
    row = {im["id"]: i for i, im in enumerate(images)}
    anns = sorted(obj["annotations"], key=lambda a: (row.get(a["image_id"], -1), a["id"]))
    orphan = [a["id"] for a in anns if a["image_id"] not in row]
    if orphan:
        raise ValueError(f"{len(orphan)} annotations point at image ids missing from 'images', e.g. {orphan[:3]}")
    return ImageTextManifest(
        image_ids=tuple(im["file_name"] for im in images),
        image_paths=tuple(str(Path(image_dir) / im["file_name"]) for im in images),
        captions=tuple(a["caption"].strip() for a in anns),
        text_to_image=tuple(row[a["image_id"]] for a in anns),
        caption_ids=tuple(str(a["id"]) for a in anns),
        name=str(json_path),
    )


def read_class_folders(root: str | Path) -> ImageTextManifest:
    """A classification set laid out as root/<class>/<image>; classes sorted by name, ids "class/file"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class-folder root not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ids, paths, labels, left_out, empty = [], [], [], [], []
    for c, name in enumerate(classes):
        found = 0
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                ids.append(f"{name}/{f.name}")
                paths.append(str(f))
                labels.append(c)
                found += 1
            elif not f.name.startswith("."):  # hidden files (.DS_Store) are no one's images
                left_out.append(f"{name}/{f.name}" + ("/" if f.is_dir() else ""))
        if not found:
            empty.append(name)
    if not ids:
        raise ValueError(f"{root} has no images in class sub-folders (expected root/<class>/*.jpg)")
    if empty:  # a class without images still gets a zero-shot prompt and a few-shot label: refuse it
        raise ValueError(
            f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove "
            "the folder(s)"
        )
    if left_out:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        warnings.warn(
            f"{root}: left out {len(left_out)} entries of class folders that are not image files ({shown}); "
            f"class folders are read one level deep, images ending in {', '.join(IMAGE_SUFFIXES)}",
            stacklevel=2,
        )
    return ImageTextManifest(
        image_ids=tuple(ids), image_paths=tuple(paths), labels=tuple(labels), class_names=tuple(classes), name=str(root)
    )


def round_robin_head(manifest: ImageTextManifest, num_images: int) -> ImageTextManifest:
    """First `num_images` of a class set taken class by class in turn, so every class appears."""
    per_class: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(manifest.labels):
        per_class[c].append(i)
    order = [rows[k] for k in range(max(map(len, per_class.values()))) for rows in per_class.values() if k < len(rows)]
    return manifest.select_images(order[:num_images], name=f"{manifest.name}:{num_images}")


def _builtin_dir(root: Path, name: str, *, given: bool) -> Path:
    """root/name, the folder of built-in data set `name`; an error naming the root, and what set it, when the
    root or the data set's folder is missing (a bare "split not found" blamed the split for a wrong root).

    Args:
        root: the data root.
        name: a `BUILTIN_DATASETS` name.
        given: True when the root was passed (`csalign encode --data-root`), False when `data_root()` found it.
    """
    source = "--data-root" if given else f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "found next to the repo"
    fix = f"pass the folder that holds flickr8k/ and flowers/ with --data-root, or set ${DATA_ENV} to it"
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data root {root} ({source}) {what}; {fix}")
    if not (root / name).is_dir():
        raise FileNotFoundError(f"data root {root} ({source}) has no {name}/ folder; {fix}")
    return root / name


def resolve_dataset(spec: str, root: str | Path | None = None) -> ImageTextManifest:
    """Turn a `--data` value into a manifest.

    Args:
        spec: "flickr8k:train[:N]", "flickr8k:dev[:N]", "flowers:train[:N]", "flowers:test[:N]",
            a manifest file, or a class-folder directory.
        root: data root for the built-ins (default `data_root()`).
    """
    name, _, rest = spec.partition(":")
    if name in BUILTIN_DATASETS and not Path(spec).exists():
        split, _, limit = rest.partition(":")
        if split not in BUILTIN_DATASETS[name]:
            raise ValueError(f"{name} has splits {BUILTIN_DATASETS[name]}, got {split!r} in {spec!r}")
        if limit and not limit.isdigit():
            raise ValueError(f"limit in {spec!r} must be a positive integer (e.g. {name}:{split}:500)")
        base = _builtin_dir(Path(root) if root is not None else data_root(), name, given=root is not None)
        if name == "flickr8k":
            m = read_flickr8k(base, split)
        else:
            m = read_class_folders(base / split).with_name(f"flowers:{split}")
        if not limit:
            return m
        if int(limit) > m.num_images:  # a clamp would name the cache "...:5000" for the 1,000 images it holds
            raise ValueError(
                f"{name}:{split} has {m.num_images} images, fewer than the limit in {spec!r}; pass a limit <= "
                f"{m.num_images}, or none ({name}:{split}) for all of them"
            )
        return m.head(int(limit)) if name == "flickr8k" else round_robin_head(m, int(limit))
    path = Path(spec)
    if path.is_dir():
        return read_class_folders(path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(path)
    known = ", ".join(f"{n}:{s}[:N]" for n, splits in BUILTIN_DATASETS.items() for s in splits)
    missing = "" if path.exists() else f" (no file or folder {spec!r} exists)"
    raise ValueError(
        f"--data {spec!r} is neither a built-in ({known}) nor a manifest file "
        f"({', '.join(MANIFEST_SUFFIXES)}) nor a class-folder directory{missing}; pass one of these"
    )
