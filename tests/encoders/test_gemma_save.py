"""The converted GGUF model folder ends with the umask's modes, not mkdtemp's / safetensors' owner-only ones."""

from __future__ import annotations

from pathlib import Path

import torch

from csaligner.encoders.gemma import save_converted


class _Config:
    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "config.json").write_text("{}")


class _Model:
    config = _Config()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(2, 2)}


class _Tokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_converted_folder_and_weights_have_the_umask_modes(tmp_path: Path, known_umask: int) -> None:
    folder = tmp_path / "converted"
    save_converted(_Tokenizer(), _Model(), folder)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~known_umask  # mkdtemp made it 0700; 0755 ignored the umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "tokenizer.json"], 0o666 & ~known_umask)
