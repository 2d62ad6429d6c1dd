"""Apply a finished run's adapters to features, for evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner.data.features import PairedFeatures
from csaligner.train.model import load_adapters


@torch.no_grad()
def embed(
    features: PairedFeatures,
    run_dir: str,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Map features through the adapters saved in `run_dir`.

    Args:
        features: image (N, D_img) and text (M, D_txt) features from the same encoders the run used.
        run_dir: a training run directory holding image_adapter.safetensors and text_adapter.safetensors.
        batch_size: rows per adapter call.
        device: where to run the adapters.
        normalize: L2-normalise the outputs (what retrieval and the loss use).

    Returns:
        (image_emb (N, D), text_emb (M, D)) float32 on CPU.
    """
    adapters = load_adapters(run_dir, device)
    tokens = features.text_tokens if adapters.uses_tokens else None
    mask = features.text_token_mask if adapters.uses_tokens else None
    image = apply_adapter(adapters.image, features.image, batch_size=batch_size, device=device)
    text = apply_adapter(adapters.text, features.text, tokens, mask, batch_size=batch_size, device=device)
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return image, text


@torch.no_grad()
def apply_adapter(
    adapter: nn.Module,
    x: Tensor,
    tokens: Tensor | None = None,
    token_mask: Tensor | None = None,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
) -> Tensor:
    """adapter(x) in chunks of `batch_size` rows; x (N, D_in) -> (N, D_out) float32 on CPU."""
    was_training = adapter.training
    adapter.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        kwargs: dict[str, Tensor | None] = {}
        if tokens is not None:
            kwargs["text_tokens"] = tokens[rows].to(device)
            kwargs["text_token_mask"] = None if token_mask is None else token_mask[rows].to(device)
        out.append(adapter(x[rows].to(device).float(), **kwargs).float().cpu())
    adapter.train(was_training)
    return torch.cat(out)
