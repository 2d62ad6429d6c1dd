"""Dual encoders from disk: `hf-clip:<dir>` (transformers CLIPModel) and `open_clip:<arch>:<checkpoint>`.

Pooled features are the projected embeddings (the shared CLIP space); tokens are the towers'
last hidden states (vision: CLS + patches; text: masked word pieces) before projection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from csaligner.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderOutput,
    EncoderUnavailableError,
    ImagePreprocess,
    Modality,
    check_texts,
    hash_files,
    image_batch,
    weight_files,
)
from csaligner.encoders.hf_quiet import silence_imported_hf_libraries
from csaligner.encoders.registry import register_encoder
from csaligner.encoders.text import TRANSFORMERS_HINT, hub_offline, model_dir

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def _clip_preprocess(directory: Path, image_size: int) -> ImagePreprocess:
    """Read mean/std/crop size from preprocessor_config.json when the folder has one."""
    cfg_path = directory / "preprocessor_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    crop = cfg.get("crop_size", image_size)
    size = int(crop["height"] if isinstance(crop, dict) else crop)
    mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    return ImagePreprocess(size=size, mean=mean, std=std, resample="bicubic")


class HFClipEncoder:
    """A transformers CLIPModel folder: both towers, projected to the shared embedding space."""

    modality: Modality = "both"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        directory = model_dir(path, "hf-clip")
        hub_offline()
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as err:
            raise EncoderUnavailableError(f"hf-clip needs {TRANSFORMERS_HINT}") from err
        silence_imported_hf_libraries()  # inside `csalign encode --quiet`: no loading bars
        self.model = CLIPModel.from_pretrained(str(directory), local_files_only=True)
        self.model.eval().requires_grad_(False).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.device = torch.device(device)
        cfg: Any = self.model.config
        self._pre = _clip_preprocess(directory, int(cfg.vision_config.image_size))
        self._max_length = int(cfg.text_config.max_position_embeddings)
        self._dim = int(cfg.projection_dim)
        self._token_dim = int(cfg.text_config.hidden_size)
        self._id = f"hf-clip@{hash_files(weight_files(directory))}"

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return self._dim

    @property
    def token_dim(self) -> int:
        """Text tokens' D; vision tokens have vision_config.hidden_size (often different)."""
        return self._token_dim

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self._pre

    @property
    def text_max_length(self) -> int:
        return self._max_length

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        x = image_batch(images, self._pre).to(self.device)
        with torch.inference_mode():
            out = self.model.vision_model(pixel_values=x)
            pooled = self.model.visual_projection(out.pooler_output)  # (B, D)
            tok = out.last_hidden_state  # (B, 1 + patches, D_vision)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        batch = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            out = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            pooled = self.model.text_projection(out.pooler_output)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, out.last_hidden_state, batch["attention_mask"].bool())


class OpenClipEncoder:
    """An open_clip architecture with a local checkpoint file (pooled features only)."""

    modality: Modality = "both"

    def __init__(self, arch: str, checkpoint: str | Path, device: str = "cpu") -> None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise EncoderUnavailableError(
                f"open_clip checkpoint file not found: {str(checkpoint)!r}; "
                "use open_clip:<arch>:<path to a local .pt/.bin/.safetensors>; nothing is downloaded"
            )
        hub_offline()
        try:
            import open_clip
        except ImportError as err:
            raise EncoderUnavailableError("open_clip:<arch>:<checkpoint> needs pip install open_clip_torch") from err
        silence_imported_hf_libraries()  # open_clip imports huggingface_hub (and transformers when installed)
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
        self.model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(ckpt), device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)
        visual = self.model.visual
        size = visual.image_size
        self._pre = ImagePreprocess(
            size=int(size[0] if isinstance(size, (tuple, list)) else size),
            mean=tuple(getattr(visual, "image_mean", None) or CLIP_MEAN),
            std=tuple(getattr(visual, "image_std", None) or CLIP_STD),
        )
        with torch.inference_mode():
            self._dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])
        self._max_length = int(getattr(self.tokenizer, "context_length", 77))
        self._id = f"open_clip-{arch}@{hash_files([ckpt])}"

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return self._dim

    @property
    def token_dim(self) -> int:
        return self._dim

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self._pre

    @property
    def text_max_length(self) -> int:
        return self._max_length

    def _no_tokens(self, tokens: bool) -> None:
        if tokens:
            raise ValueError("open_clip encoders give pooled features only; use hf-clip:<dir> for token features")

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        self._no_tokens(tokens)
        x = image_batch(images, self._pre).to(self.device)
        with torch.inference_mode():
            return EncoderOutput(self.model.encode_image(x))

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        self._no_tokens(tokens)
        ids = self.tokenizer(check_texts(texts)).to(self.device)
        with torch.inference_mode():
            return EncoderOutput(self.model.encode_text(ids))


@register_encoder("hf-clip", takes_arg=True, usage="hf-clip:<dir>", help="transformers CLIPModel folder (both)")
def _hf_clip(path: str, *, device: str = "cpu") -> HFClipEncoder:
    return HFClipEncoder(path, device=device)


@register_encoder(
    "open_clip",
    takes_arg=True,
    usage="open_clip:<arch>:<checkpoint>",
    help="open_clip architecture + local checkpoint (both; needs open_clip_torch)",
)
def _open_clip(arg: str, *, device: str = "cpu") -> OpenClipEncoder:
    arch, sep, ckpt = arg.partition(":")
    if not sep or not arch or not ckpt:
        raise ValueError(f"open_clip needs an architecture and a checkpoint path: open_clip:<arch>:<file>, got {arg!r}")
    return OpenClipEncoder(arch, ckpt, device=device)
