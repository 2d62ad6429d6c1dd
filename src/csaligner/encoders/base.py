"""The `FrozenEncoder` protocol, its output type and the image preprocessing every encoder describes.

An encoder is a frozen pretrained backbone: `encode_images` / `encode_texts` run under
`torch.inference_mode` and return pooled features (B, D) and, when asked, token features
(B, T, D_tok) with a (B, T) bool mask. Its `id` names the weights (with a content hash), so the
feature cache can tell two encoders apart even when they share a name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

Modality = Literal["image", "text", "both"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderUnavailableError(ValueError):
    """An encoder's package or weight files are missing; the message says what to install or pass."""


@dataclass(frozen=True)
class ImagePreprocess:
    """How an encoder wants its images: resize the shorter side, centre-crop, scale to [0, 1], normalise.

    Picklable, so DataLoader workers can decode and preprocess without holding the model.

    Attributes:
        size: output height and width in pixels (square crop).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided after subtracting the mean.
        resample: PIL resampling filter name for the resize ("bicubic" or "bilinear").
    """

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ImagePreprocess.size must be > 0, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got mean={self.mean}, std={self.std}")
        if self.resample not in ("bicubic", "bilinear"):
            raise ValueError(f"resample must be 'bicubic' or 'bilinear', got {self.resample!r}")

    def describe(self) -> dict[str, object]:
        """JSON-able description; part of the feature-cache key."""
        return {"kind": "shorter-side-resize+center-crop", **asdict(self)}

    def __call__(self, image: PILImage) -> Tensor:
        """Return a (3, size, size) float32 tensor."""
        from PIL import Image

        img = image.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        if (w, h) != (self.size, self.size):
            filt = Image.Resampling.BICUBIC if self.resample == "bicubic" else Image.Resampling.BILINEAR
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            img = img.resize((nw, nh), filt)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.array(img, dtype=np.float32, copy=True)).permute(2, 0, 1).div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


@dataclass
class EncoderOutput:
    """What an encoder returns for one batch.

    Attributes:
        pooled: (B, D) one vector per sample.
        tokens: (B, T, D_tok) token features, or None when not requested.
        mask: (B, T) bool, True for real tokens (padding False), or None with tokens.
    """

    pooled: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None


@runtime_checkable
class FrozenEncoder(Protocol):
    """A frozen image and/or text backbone.

    Attributes:
        id: stable identifier including a hash of the weight files, e.g. "minilm@9f2c...": a name, "@",
            then a fingerprint holding no "@" (`encoder_name` takes the name back).
        modality: "image", "text" or "both".
        embed_dim: D of the pooled features.
        token_dim: D_tok of the token features.
        image_preprocess: how images are prepared, None for text-only encoders.
        text_max_length: truncation length in tokens, None for image-only encoders.
    """

    @property
    def id(self) -> str: ...

    @property
    def modality(self) -> Modality: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def token_dim(self) -> int: ...

    @property
    def image_preprocess(self) -> ImagePreprocess | None: ...

    @property
    def text_max_length(self) -> int | None: ...

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput: ...

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput: ...


def image_batch(images: Tensor | Sequence[PILImage], preprocess: ImagePreprocess | None) -> Tensor:
    """Stack PIL images through `preprocess`, or check an already preprocessed (B, 3, H, W) tensor."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return images.float()
    if preprocess is None:
        raise ValueError("this encoder has no image tower; pass texts to encode_texts instead")
    if len(images) == 0:
        raise ValueError("encode_images got an empty batch; pass at least one image")
    return torch.stack([preprocess(im) for im in images])


def check_texts(texts: Sequence[str]) -> list[str]:
    """A non-empty list of strings (a bare str is a common mistake: it would be split into characters)."""
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings, got one str; wrap it: [text]")
    out = list(texts)
    if not out:
        raise ValueError("encode_texts got an empty list; pass at least one caption")
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode_texts needs str items; items {bad[:5]} are {type(out[bad[0]]).__name__}")
    return out


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) hidden states, (B, T) mask -> (B, D) mean over the real tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encoder_name(encoder_id: str) -> str:
    """The name part of an encoder id "<name>@<fingerprint>": everything before its last "@".

    The fingerprint is made by the encoder (a weights hash, "-l2", a seed: "minilm@4b8c5d5e-l2",
    "tiny-text@seed0-b4096-v1") and holds no "@", but a name may (a registered "clip@336px", or a folder
    given as the name), so "clip@336px@4b8c" -> "clip@336px". An id without "@" is all name.
    """
    name, sep, _ = encoder_id.rpartition("@")
    return name if sep else encoder_id


_HASHES: dict[tuple[str, int, int], str] = {}


def hash_files(paths: Iterable[str | os.PathLike[str]], length: int = 16) -> str:
    """sha256 over the contents of `paths` (sorted by name), first `length` hex digits.

    Memoised per (path, size, mtime) so reloading an encoder in one process hashes once.
    """
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _HASHES:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    fh.update(chunk)
            _HASHES[memo] = fh.hexdigest()
        h.update(p.name.encode() + b"\0" + _HASHES[memo].encode())
    return h.hexdigest()[:length]


def weight_files(directory: Path) -> list[Path]:
    """The files whose content defines a Hugging Face style model folder (weights and configs)."""
    pats = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json", "*tokenizer*.json", "vocab.*")
    files = sorted({f for pat in pats for f in directory.glob(pat) if f.is_file()})
    if not files:
        raise EncoderUnavailableError(f"no weight files (*.safetensors, *.bin, config.json) in {directory}")
    return files
