"""Tiny randomly initialised encoders (seeded, pure torch): fast stand-ins for tests and demos.

`tiny-image` is a 2-layer conv net on 32x32 crops -> (B, 16) pooled and 16 spatial tokens;
`tiny-text` hashes words into an embedding table -> (B, 16) pooled and one token per word.
Their features carry no meaning, but they are deterministic, so the cache, resume and
loading paths can be exercised in milliseconds.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from csaligner.encoders.base import (
    EncoderOutput,
    ImagePreprocess,
    Modality,
    check_texts,
    image_batch,
    mean_pool,
)
from csaligner.encoders.registry import register_encoder

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

TINY_DIM = 16


class TinyImageEncoder:
    """Seeded random conv net: (B, 3, 32, 32) -> (B, 16, 4, 4) map; pooled = mean of the 16 cells."""

    modality: Modality = "image"
    text_max_length = None

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Conv2d(8, TINY_DIM, 2, stride=2))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self._id = f"tiny-image@seed{seed}-v1"
        self._pre = ImagePreprocess(size=32, resample="bilinear")

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return TINY_DIM

    @property
    def token_dim(self) -> int:
        return TINY_DIM

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self._pre

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        x = image_batch(images, self._pre).to(self.device)
        with torch.inference_mode():
            fmap = self.net(x)  # (B, 16, 4, 4)
            tok = fmap.flatten(2).transpose(1, 2)  # (B, 16 cells, 16)
            pooled = tok.mean(1)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        raise ValueError(f"{self.id} is an image encoder; use a text encoder such as 'tiny-text' for captions")


class TinyTextEncoder:
    """Seeded random bag of hashed words: word -> crc32 bucket -> embedding -> tanh(linear)."""

    modality: Modality = "text"
    image_preprocess = None

    def __init__(self, seed: int = 0, device: str = "cpu", buckets: int = 512, max_length: int = 16) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        self.emb = nn.Embedding(buckets, TINY_DIM)
        self.proj = nn.Linear(TINY_DIM, TINY_DIM)
        with torch.no_grad():
            for p in [*self.emb.parameters(), *self.proj.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in (self.emb, self.proj):
            m.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.buckets = buckets
        self._max_length = max_length
        self._id = f"tiny-text@seed{seed}-b{buckets}-v1"

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return TINY_DIM

    @property
    def token_dim(self) -> int:
        return TINY_DIM

    @property
    def text_max_length(self) -> int:
        return self._max_length

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """-> (B, L) bucket ids and (B, L) bool mask; an empty caption keeps one padding token."""
        words = [t.lower().split()[: self._max_length] or [""] for t in texts]
        length = max(len(w) for w in words)
        ids = torch.zeros(len(words), length, dtype=torch.long)
        mask = torch.zeros(len(words), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            ids[i, : len(ws)] = torch.tensor([zlib.crc32(w.encode()) % self.buckets for w in ws])
            mask[i, : len(ws)] = True
        return ids.to(self.device), mask.to(self.device)

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        raise ValueError(f"{self.id} is a text encoder; use an image encoder such as 'tiny-image' for images")

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        ids, mask = self.tokenize(check_texts(texts))
        with torch.inference_mode():
            tok = torch.tanh(self.proj(self.emb(ids)))  # (B, L, 16)
            pooled = mean_pool(tok, mask)
        return EncoderOutput(pooled, tok, mask) if tokens else EncoderOutput(pooled)


@register_encoder("tiny-image", help="random 16-d conv net on 32x32 images (tests, demos)")
def _tiny_image(*, device: str = "cpu") -> TinyImageEncoder:
    return TinyImageEncoder(device=device)


@register_encoder("tiny-text", help="random 16-d hashed bag of words (tests, demos)")
def _tiny_text(*, device: str = "cpu") -> TinyTextEncoder:
    return TinyTextEncoder(device=device)
