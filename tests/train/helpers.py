"""Synthetic PairedFeatures and quick-run overrides for the training tests."""

from __future__ import annotations

import torch

from csaligner.data.features import PairedFeatures


def synthetic_features(
    n_images: int = 48, d_img: int = 24, d_txt: int = 16, seed: int = 0, tokens: bool = False
) -> PairedFeatures:
    """Images with 5 (a few with 2) noisy linear captions, 4 unpaired texts and 2 caption-less images."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_images, 8, generator=g)
    image = latent @ torch.randn(8, d_img, generator=g) + 0.1 * torch.randn(n_images, d_img, generator=g)
    to_text = torch.randn(8, d_txt, generator=g)
    per_image = [2 if i % 7 == 3 else 5 for i in range(n_images - 2)]  # the last 2 images have no caption
    t2i = torch.tensor([i for i, c in enumerate(per_image) for _ in range(c)] + [-1] * 4)
    text = torch.cat([latent[t2i[:-4]] @ to_text, torch.randn(4, 8, generator=g) @ to_text])
    text = text + 0.3 * torch.randn(text.shape, generator=g)
    order = torch.randperm(t2i.numel(), generator=g)  # captions not stored grouped by image
    t2i, text = t2i[order], text[order]
    extra = {}
    if tokens:
        m = t2i.numel()
        text_mask = torch.arange(6).unsqueeze(0) < torch.randint(2, 7, (m, 1), generator=g)
        extra = dict(
            image_tokens=image.unsqueeze(1) + 0.2 * torch.randn(n_images, 4, d_img, generator=g),
            text_tokens=text.unsqueeze(1) + 0.2 * torch.randn(m, 6, d_txt, generator=g),
            text_token_mask=text_mask,
        )
    return PairedFeatures(
        image=image, text=text, text_to_image=t2i, image_ids=[f"img{i}" for i in range(n_images)], **extra
    )


def fast_overrides(out_dir: object, *extra: str) -> list[str]:
    """Overrides for a quick synthetic run writing to out_dir."""
    return [
        f"train.out_dir={out_dir}",
        "train.batch_size=16",
        "train.lr=1e-2",
        "train.warmup_steps=2",
        "train.progress=false",
        "train.tensorboard=false",
        "train.log_every=1",
        "model.out_dim=12",
        *extra,
    ]
