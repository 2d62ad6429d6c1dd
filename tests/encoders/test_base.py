"""Preprocessing, pooling, hashing and the tiny encoders' contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csaligner.encoders import FrozenEncoder, ImagePreprocess, encoder_name, hash_files, mean_pool
from csaligner.encoders.tiny import TinyImageEncoder, TinyTextEncoder


def test_preprocess_resizes_shorter_side_and_centre_crops() -> None:
    arr = np.zeros((20, 60, 3), dtype=np.uint8)  # h=20, w=60: left/right thirds black, middle white
    arr[:, 20:40] = 255
    pre = ImagePreprocess(size=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resample="bilinear")
    x = pre(Image.fromarray(arr))
    assert x.shape == (3, 10, 10)
    # Shorter side 20 -> 10, width 60 -> 30; the centre crop keeps columns 10..20 = the white band.
    assert float(x[:, :, 2:8].min()) > 0.95


def test_preprocess_normalises_with_mean_and_std() -> None:
    img = Image.new("RGB", (8, 8), (51, 102, 153))
    x = ImagePreprocess(size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))(img)
    want = (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor([0.1, 0.2, 0.3])) / 0.5
    torch.testing.assert_close(x[:, 0, 0], want)


def test_preprocess_validation() -> None:
    with pytest.raises(ValueError, match="size"):
        ImagePreprocess(size=0)
    with pytest.raises(ValueError, match="std > 0"):
        ImagePreprocess(size=4, std=(1.0, 0.0, 1.0))


def test_mean_pool_ignores_padding() -> None:
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    torch.testing.assert_close(mean_pool(h, torch.tensor([[True, True, False]])), torch.tensor([[2.0]]))


def test_hash_files_tracks_content(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    a = hash_files([f])
    f.write_bytes(b"two!")
    assert hash_files([f]) != a and len(a) == 16


@pytest.mark.parametrize(
    ("encoder_id", "name"),
    [
        ("minilm@4b8c5d5e-l2", "minilm"),
        ("tiny-text@seed0-b512-v1", "tiny-text"),
        ("clip@336px@4b8c5d5e", "clip@336px"),  # a registered name may hold "@"; the fingerprint never does
        ("hf-text:/data/x@y@4b8c5d5e", "hf-text:/data/x@y"),  # a folder given as the name
        ("custom", "custom"),  # an id without a fingerprint is all name
    ],
)
def test_encoder_name_splits_the_id_at_its_last_at(encoder_id: str, name: str) -> None:
    assert encoder_name(encoder_id) == name


def test_tiny_image_encoder_contract() -> None:
    enc = TinyImageEncoder()
    assert isinstance(enc, FrozenEncoder) and enc.modality == "image"
    imgs = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 0, 255)]]
    out = enc.encode_images(imgs, tokens=True)
    assert out.pooled.shape == (2, 16) and out.tokens is not None and out.tokens.shape == (2, 16, 16)
    assert out.mask is not None and out.mask.all()
    stacked = torch.stack([enc.image_preprocess(i) for i in imgs])
    torch.testing.assert_close(enc.encode_images(stacked).pooled, out.pooled)
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    torch.testing.assert_close(TinyImageEncoder().encode_images(imgs).pooled, out.pooled)  # seeded
    with pytest.raises(ValueError, match="image encoder"):
        enc.encode_texts(["a"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.encode_images(torch.zeros(3, 32, 32))


def test_tiny_text_encoder_contract() -> None:
    enc = TinyTextEncoder()
    assert isinstance(enc, FrozenEncoder) and enc.modality == "text"
    out = enc.encode_texts(["a dog", "a dog runs on the grass"], tokens=True)
    assert out.tokens is not None and out.mask is not None
    assert out.tokens.shape == (2, 6, 16) and out.mask.sum(1).tolist() == [2, 6]
    torch.testing.assert_close(enc.encode_texts(["a dog"]).pooled[0], out.pooled[0])  # padding-invariant
    with pytest.raises(TypeError, match="wrap it"):
        enc.encode_texts("a dog")
    with pytest.raises(ValueError, match="empty"):
        enc.encode_texts([])
