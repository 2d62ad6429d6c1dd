"""Tiny stand-ins for csaligner.adapters and synthetic PairedFeatures for the training tests.

The adapters module is built in parallel; until it lands these follow its contract:
AdapterConfig(kind, in_dim, out_dim, ...), build_adapter(cfg) -> module with
forward(x, text_tokens=None, text_token_mask=None), save_adapter(module, cfg, path), load_adapter(path).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import Tensor, nn

from csaligner.data.features import PairedFeatures


@dataclasses.dataclass(frozen=True)
class StandInAdapterConfig:
    kind: str = "mlp"
    in_dim: int = 0
    out_dim: int = 0
    hidden_dim: int = 32
    dropout: float = 0.0


class StandInAdapter(nn.Module):
    """identity / linear / 2-layer MLP; "prior" adds the masked mean of the text tokens to the input."""

    def __init__(self, cfg: StandInAdapterConfig) -> None:
        super().__init__()
        self.kind = cfg.kind
        if cfg.kind == "identity":
            self.net: nn.Module = nn.Identity()
        elif cfg.kind == "linear":
            self.net = nn.Linear(cfg.in_dim, cfg.out_dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(cfg.in_dim, cfg.hidden_dim),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, cfg.out_dim),
            )

    def forward(self, x: Tensor, text_tokens: Tensor | None = None, text_token_mask: Tensor | None = None) -> Tensor:
        if self.kind == "prior" and text_tokens is not None:
            m = torch.ones(text_tokens.shape[:2], device=x.device) if text_token_mask is None else text_token_mask
            m = m.to(x.dtype).unsqueeze(-1)
            x = x + (text_tokens.to(x.dtype) * m).sum(1) / m.sum(1).clamp_min(1)
        return self.net(x)


def build_adapter(cfg: StandInAdapterConfig) -> nn.Module:
    return StandInAdapter(cfg)


def save_adapter(module: nn.Module, config: StandInAdapterConfig, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, path, metadata={"config": json.dumps(dataclasses.asdict(config))})


def load_adapter(path: str) -> tuple[nn.Module, StandInAdapterConfig]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        cfg = StandInAdapterConfig(**json.loads(f.metadata()["config"]))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    module = build_adapter(cfg)
    module.load_state_dict(tensors)
    return module, cfg


API = {
    "AdapterConfig": StandInAdapterConfig,
    "build_adapter": build_adapter,
    "save_adapter": save_adapter,
    "load_adapter": load_adapter,
}


def install(setattr_fn=setattr) -> None:
    """Put the stand-ins on csaligner.adapters unless the real implementation is there."""
    import csaligner.adapters as adapters

    if all(hasattr(adapters, name) for name in API):
        return
    for name, obj in API.items():
        setattr_fn(adapters, name, obj)


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
