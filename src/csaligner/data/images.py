"""Image decoding for encoding: a full-decode scan for missing/corrupt files and a DataLoader dataset.

`scan_images` decodes every image once (about 1 ms for a 224x224 JPEG) so bad files are found
and reported all together before any feature is written; `on_bad_image` then decides whether
that is an error ("fail") or the files are left out and listed ("skip").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from csaligner.encoders.base import ImagePreprocess

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

OnBadImage = Literal["fail", "skip"]
ON_BAD_IMAGE = ("fail", "skip")


@dataclass(frozen=True)
class BadImage:
    """One image that could not be decoded."""

    row: int
    image_id: str
    path: str
    reason: str


class BadImageError(ValueError):
    """Some images are missing or corrupt and on_bad_image="fail"."""

    def __init__(self, bad: Sequence[BadImage], total: int) -> None:
        self.bad = list(bad)
        super().__init__(
            f"{bad_image_report(bad, total)}\nfix or remove them, or pass on_bad_image='skip' "
            "(--on-bad-image skip) to leave them out"
        )


def bad_image_report(bad: Sequence[BadImage], total: int, limit: int = 10, outcome: str = "") -> str:
    """'3 of 500 images could not be read{outcome}:' and one line per image (the first `limit`).

    `outcome` continues the sentence, e.g. " and will be left out of the cache".
    """
    lines = [f"{len(bad)} of {total} images could not be read{outcome}:"]
    lines += [f"  {b.path}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def open_image(path: str) -> PILImage:
    """Decode an image fully (PIL is lazy; load() catches truncated files) and return it as RGB."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class _ScanDataset(Dataset[str]):
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        try:
            open_image(self.paths[i])
        except FileNotFoundError:
            return "file not found"
        except Exception as err:  # any decoder failure makes the image unusable
            return f"{type(err).__name__}: {err}"
        return ""


def scan_images(
    paths: Sequence[str], image_ids: Sequence[str] | None = None, workers: int = 0, progress: bool = True
) -> list[BadImage]:
    """Decode every image; return the ones that fail (empty list when all are fine)."""
    from tqdm.auto import tqdm

    ids = list(image_ids) if image_ids is not None else list(paths)
    loader = DataLoader(_ScanDataset(paths), batch_size=64, num_workers=workers, collate_fn=list)
    bad: list[BadImage] = []
    row = 0
    with tqdm(total=len(paths), desc="check images", unit="img", disable=not progress, file=sys.stderr) as bar:
        for reasons in loader:
            for r in reasons:
                if r:
                    bad.append(BadImage(row, ids[row], paths[row], r))
                row += 1
            bar.update(len(reasons))
    return bad


class ImageFileDataset(Dataset[Tensor]):
    """Decode + preprocess images in DataLoader workers: item i -> (3, S, S) float tensor."""

    def __init__(self, paths: Sequence[str], preprocess: ImagePreprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            img = open_image(self.paths[i])
        except Exception as err:
            raise ValueError(
                f"cannot read image {self.paths[i]}: {err} (it decoded in the scan; did it change?)"
            ) from err
        return self.preprocess(img)


def image_loader(paths: Sequence[str], preprocess: ImagePreprocess, batch_size: int, workers: int) -> DataLoader:
    """Ordered batches of (B, 3, S, S) tensors; `workers` processes decode in parallel."""
    return DataLoader(
        ImageFileDataset(paths, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=torch.stack,
        persistent_workers=False,
    )
