"""Without diffusers/transformers/Pillow, csaligner.decode imports and the CLI builds; using them names the install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from csaligner.decode import MissingDependencyError
from csaligner.decode._deps import require

SRC = Path(__file__).resolve().parents[2] / "src"

# Run in a fresh interpreter where the optional packages cannot be imported (a None entry in sys.modules).
SCRIPT = """
import json, sys
for name in ("diffusers", "transformers", "PIL", "PIL.Image"):
    sys.modules[name] = None
import csaligner.decode as dec
from csaligner.cli import build_parser, main
build_parser()  # every subcommand registers without the optional packages
folder = sys.argv[1]
open(folder + "/model_index.json", "w").write(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
try:
    dec.load_decoder("kandinsky22", folder)
except dec.MissingDependencyError as err:
    print("LOAD:", err)
rc = main(["generate", "--decoder", "kandinsky22", "--decoder-path", folder, "--embeddings", sys.argv[2],
           "--prompts", sys.argv[3], "--out", folder + "/out"])
print("RC:", rc)
"""


def test_decode_works_without_optional_packages(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch

    safetensors_torch.save_file({"image_embeds": torch.zeros(1, 4)}, tmp_path / "e.safetensors")
    (tmp_path / "p.txt").write_text("a prompt\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-c", SCRIPT, str(tmp_path), str(tmp_path / "e.safetensors"), str(tmp_path / "p.txt")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LOAD: load_decoder needs the optional package 'diffusers'" in done.stdout
    assert "pip install 'csaligner[decode]'" in done.stdout
    assert "RC: 1" in done.stdout and "pip install 'csaligner[decode]'" in done.stderr


def test_require_names_the_install_command() -> None:
    with pytest.raises(MissingDependencyError, match=r"needs the optional package 'no_such_pkg'.*pip install 'x-y'"):
        require("no_such_pkg", "a feature", install="x-y")
    assert require("json", "a feature").dumps([]) == "[]"
