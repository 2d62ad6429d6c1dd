"""`ImageTextManifest`: which images and captions a data set has and how they pair up.

One row per unique image and one per caption; `text_to_image` links each caption to its image
(-1 = an unpaired caption), so five captions per image are a group, and image-only or text-only
pools are the same type with no links. Files: TSV / CSV / JSONL (Parquet with pyarrow) with
columns `image`, `caption` and optional `group` (the image's id; default its path),
`caption_id`, `label` (class name). An empty `caption` is an image-only row, an empty `image`
a text-only row.

TSV is plain: one row per line, fields split on every tab, quotes kept as written (a caption may
start with `"`), so it cannot hold tabs or line breaks; fields csv-quoted by older csaligner versions
are reported, and read_manifest(..., tsv_quoting="csv") reads such a file (see `data.delimited`).
CSV uses standard quoting, read strictly: a malformed quote, a field spanning lines (a runaway quote)
or a wrong field count is an error naming the file and line. JSONL holds anything.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from csaligner._validation import is_integer
from csaligner.data.delimited import TSV_QUOTINGS, TsvQuoting, read_csv_rows, read_tsv_rows

MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
# Accepted spellings of the two required columns (open_clip CSVs use filepath/title).
_IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "path")
_CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass(frozen=True)
class ImageTextManifest:
    """Images, captions and their links.

    Attributes:
        image_ids: N unique identifiers (file names or the `group` column), in row order.
        image_paths: N paths to the image files.
        captions: M caption strings.
        text_to_image: M image rows, -1 for an unpaired caption.
        caption_ids: M caption identifiers, or empty.
        labels: N class indices for classification sets, or empty.
        class_names: class index -> name, or empty.
        name: where it came from ("flickr8k:train:500", a file path); not part of the hash.
    """

    image_ids: tuple[str, ...]
    image_paths: tuple[str, ...]
    captions: tuple[str, ...] = ()
    text_to_image: tuple[int, ...] = ()
    caption_ids: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n, m = len(self.image_ids), len(self.captions)
        if len(self.image_paths) != n:
            raise ValueError(f"{len(self.image_paths)} image_paths for {n} image_ids")
        if len(set(self.image_ids)) != n:
            dup = sorted(i for i, c in Counter(self.image_ids).items() if c > 1)[:5]
            raise ValueError(f"image_ids must be unique; repeated: {dup}")
        if len(self.text_to_image) != m:
            raise ValueError(f"{len(self.text_to_image)} text_to_image entries for {m} captions")
        bad = [t for t in self.text_to_image if not -1 <= t < n]
        if bad:
            raise ValueError(f"text_to_image values must lie in [-1, {n - 1}], got e.g. {bad[:5]}")
        if self.caption_ids and len(self.caption_ids) != m:
            raise ValueError(f"{len(self.caption_ids)} caption_ids for {m} captions")
        if self.labels:
            if len(self.labels) != n:
                raise ValueError(f"{len(self.labels)} labels for {n} images")
            if not all(0 <= c < len(self.class_names) for c in self.labels):
                raise ValueError(f"labels must index class_names (0..{len(self.class_names) - 1})")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    def content_hash(self) -> str:
        """sha256 of the items (ids, captions, links, labels): the data part of a feature-cache key.

        Paths are left out so a data set moved to another folder keeps its cache.
        """
        payload = {k: v for k, v in self.to_json().items() if k not in ("image_paths", "name")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def captions_of(self, image_row: int) -> list[int]:
        """Caption rows linked to one image row."""
        return [j for j, t in enumerate(self.text_to_image) if t == image_row]

    def select_images(self, rows: Sequence[int], name: str | None = None) -> ImageTextManifest:
        """Keep the given image rows (in that order) and their captions; unpaired captions are dropped.

        Args:
            rows: distinct image rows in [0, num_images) (a bool is not a row: [True, False] read as rows 1, 0).
            name: the new manifest's name (default: this one's).
        """
        bad = [r for r in rows if not is_integer(r) or not 0 <= r < self.num_images]
        if bad:  # -1 kept the last image but dropped its captions (they link to its row, not to -1)
            raise ValueError(f"rows must be integers in [0, {self.num_images - 1}] (image rows), got {bad[:5]}")
        remap = {old: new for new, old in enumerate(rows)}
        keep = [j for j, t in enumerate(self.text_to_image) if t in remap]
        return ImageTextManifest(
            image_ids=tuple(self.image_ids[i] for i in rows),
            image_paths=tuple(self.image_paths[i] for i in rows),
            captions=tuple(self.captions[j] for j in keep),
            text_to_image=tuple(remap[self.text_to_image[j]] for j in keep),
            caption_ids=tuple(self.caption_ids[j] for j in keep) if self.caption_ids else (),
            labels=tuple(self.labels[i] for i in rows) if self.labels else (),
            class_names=self.class_names,
            name=self.name if name is None else name,
        )

    def head(self, num_images: int) -> ImageTextManifest:
        """The first `num_images` images and their captions."""
        if num_images < 1:
            raise ValueError(f"limit must be >= 1 image, got {num_images}")
        return self.select_images(range(min(num_images, self.num_images)), name=f"{self.name}:{num_images}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_ids": list(self.image_ids),
            "image_paths": list(self.image_paths),
            "captions": list(self.captions),
            "text_to_image": list(self.text_to_image),
            "caption_ids": list(self.caption_ids),
            "labels": list(self.labels),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageTextManifest:
        return cls(
            image_ids=tuple(obj["image_ids"]),
            image_paths=tuple(obj["image_paths"]),
            captions=tuple(obj.get("captions", ())),
            text_to_image=tuple(int(t) for t in obj.get("text_to_image", ())),
            caption_ids=tuple(obj.get("caption_ids", ())),
            labels=tuple(int(c) for c in obj.get("labels", ())),
            class_names=tuple(obj.get("class_names", ())),
            name=str(obj.get("name", "")),
        )

    def with_name(self, name: str) -> ImageTextManifest:
        return replace(self, name=name)


def _pick(columns: Sequence[str], options: Sequence[str], path: Path, what: str) -> str:
    for c in options:
        if c in columns:
            return c
    raise ValueError(f"{path}: no {what} column; expected one of {list(options)}, found {list(columns)}")


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, str]]]:
    rows: list[tuple[str, dict[str, str]]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object: {err}") from err
            if not isinstance(obj, dict):
                raise ValueError(
                    f'{path}:{n}: expected a JSON object like {{"image": ..., "caption": ...}}, '
                    f"got {type(obj).__name__}"
                )
            rows.append((f"{path}:{n}", {k: "" if v is None else str(v) for k, v in obj.items()}))
    return rows


def _read_rows(path: Path, tsv_quoting: TsvQuoting = "verbatim") -> list[tuple[str, dict[str, str]]]:
    """(where, row) pairs; `where` ("m.tsv:3") names the row in errors."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return read_tsv_rows(path, tsv_quoting)
    if suffix == ".csv":
        return read_csv_rows(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(
                f"reading {path} needs pyarrow: pip install pyarrow, or convert it to .tsv/.jsonl"
            ) from err
        table = pq.read_table(path).to_pylist()
        return [
            (f"{path} row {i}", {k: "" if v is None else str(v) for k, v in r.items()}) for i, r in enumerate(table)
        ]
    raise ValueError(f"unknown manifest format {path.suffix!r} for {path}; use one of {MANIFEST_SUFFIXES}")


def read_manifest(
    path: str | Path, image_root: str | Path | None = None, tsv_quoting: TsvQuoting = "verbatim"
) -> ImageTextManifest:
    """Read a paired (or unpaired) manifest file.

    Args:
        path: .tsv, .csv, .jsonl or .parquet with columns image, caption [, group, caption_id, label].
        image_root: folder that relative image paths start from (default the manifest's folder).
        tsv_quoting: how a .tsv is read: "verbatim" (quotes are text; warns when fields look csv-quoted
            by an older csaligner) or "csv" (csv quoting, as older csaligner versions wrote .tsv).
            Other formats have one reading each and ignore it.
    """
    if tsv_quoting not in TSV_QUOTINGS:
        raise ValueError(f"tsv_quoting must be one of {TSV_QUOTINGS}, got {tsv_quoting!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    try:
        rows = _read_rows(p, tsv_quoting)
    except UnicodeDecodeError as err:  # the bare codec error names neither the file nor the fix
        raise ValueError(
            f"{p} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} at offset {err.start}); "
            "save it as UTF-8"
        ) from err
    if not rows:
        raise ValueError(f"{p} has no rows")
    cols = list(rows[0][1].keys())
    img_col = _pick(cols, _IMAGE_COLUMNS, p, "image")
    cap_col = _pick(cols, _CAPTION_COLUMNS, p, "caption")
    root = Path(image_root) if image_root is not None else p.parent
    ids: dict[str, int] = {}
    paths: list[str] = []
    labels: list[str] = []
    captions: list[str] = []
    t2i: list[int] = []
    cap_ids: list[str] = []
    for where, r in rows:
        image, caption = (r.get(img_col) or "").strip(), r.get(cap_col) or ""
        if not image and not caption.strip():
            raise ValueError(f"{where}: both image and caption are empty; fill one or delete the row")
        row = -1
        if image:
            key = (r.get("group") or "").strip() or image
            if key not in ids:
                ids[key] = len(paths)
                paths.append(str(root / image) if not Path(image).is_absolute() else image)
                labels.append((r.get("label") or "").strip())
            row = ids[key]
        if caption.strip():
            captions.append(caption.strip())
            t2i.append(row)
            cap_ids.append((r.get("caption_id") or "").strip())
    names = sorted({c for c in labels if c})
    if names and not all(labels):
        raise ValueError(f"{p}: the label column is filled for some images only; label every image or none")
    return ImageTextManifest(
        image_ids=tuple(ids),
        image_paths=tuple(paths),
        captions=tuple(captions),
        text_to_image=tuple(t2i),
        caption_ids=tuple(cap_ids) if any(cap_ids) else (),
        labels=tuple(names.index(c) for c in labels) if names else (),
        class_names=tuple(names),
        name=str(p),
    )


def manifest_rows(manifest: ImageTextManifest) -> list[dict[str, str]]:
    """One row per caption (with its image), then one per caption-less image."""
    m = manifest
    rows: list[dict[str, str]] = []

    def image_cols(i: int) -> dict[str, str]:
        label = m.class_names[m.labels[i]] if m.labels else ""
        return {"image": m.image_paths[i], "group": m.image_ids[i], "label": label}

    for j, (cap, t) in enumerate(zip(m.captions, m.text_to_image, strict=True)):
        base = image_cols(t) if t >= 0 else {"image": "", "group": "", "label": ""}
        rows.append({**base, "caption": cap, "caption_id": m.caption_ids[j] if m.caption_ids else ""})
    with_caption = set(m.text_to_image)
    for i in range(m.num_images):
        if i not in with_caption:
            rows.append({**image_cols(i), "caption": "", "caption_id": ""})
    return rows


def _check_delimited(rows: list[dict[str, str]], cols: list[str], path: Path) -> None:
    """Refuse values that .tsv/.csv cannot hold as `read_manifest` reads them, before anything is written."""
    bad: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for c in cols:
            v = r[c]
            if "\n" in v or "\r" in v:
                bad.setdefault((c, "a line break"), []).append(v)
            elif path.suffix.lower() == ".tsv" and "\t" in v:
                bad.setdefault((c, "a tab"), []).append(v)
    if not bad:
        return
    found = "; ".join(
        f"{len(vs)} {c} {'field contains' if len(vs) == 1 else 'fields contain'} {what}, e.g. {vs[0]!r}"
        for (c, what), vs in bad.items()
    )
    if any(what == "a line break" for _, what in bad):
        why, fix = "rows of .tsv and .csv manifests are single lines", "write .jsonl instead"
    else:
        why, fix = ".tsv fields are split on every tab", "write .csv or .jsonl instead"
    raise ValueError(f"cannot write {path}: {found}; {why}, so {fix}")


def write_manifest(manifest: ImageTextManifest, path: str | Path) -> Path:
    """Write `manifest` as .tsv, .csv, .jsonl or .parquet (by suffix); `read_manifest` reads it back."""
    p = Path(path)
    rows = manifest_rows(manifest)
    cols = ["image", "caption", "group", "caption_id", "label"]
    suffix = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".tsv", ".csv"):
        _check_delimited(rows, cols, p)
        with open(p, "w", newline="", encoding="utf-8") as f:
            if suffix == ".tsv":  # verbatim, like the reader: no quoting, one row per line
                f.writelines("\t".join(row) + "\n" for row in [cols, *([r[c] for c in cols] for r in rows)])
            else:
                w = csv.DictWriter(f, fieldnames=cols)  # quotes fields with commas or quotes, doubling the quotes
                w.writeheader()
                w.writerows(rows)
    elif suffix == ".jsonl":
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"writing {p} needs pyarrow: pip install pyarrow, or write .tsv/.jsonl") from err
        pq.write_table(pa.Table.from_pylist(rows), p)
    else:
        raise ValueError(f"unknown manifest format {p.suffix!r} for {p}; use one of {MANIFEST_SUFFIXES}")
    return p
