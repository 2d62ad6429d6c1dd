"""`csalign encode` end to end on tiny data: exit codes, files written, numbers inside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from csaligner.cli import main
from csaligner.data import ImageTextManifest, load_paired_features, write_manifest

from .test_manifest import _fake_root


def encode(*args: str) -> int:
    return main(["encode", "--quiet", *args])


def test_encode_manifest_file_then_load(
    tiny_manifest: ImageTextManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_manifest(tiny_manifest, tmp_path / "m.jsonl")
    rc = encode("--encoder", "tiny-image", "--data", str(path), "--out", str(tmp_path / "img"), "--tokens",
                "--shard-size", "3", "--dtype", "fp32")  # fmt: skip
    assert rc == 0
    assert "image: 7 rows, dim 16, 3 shards; encoded 7 now" in capsys.readouterr().out
    assert encode("--encoder", "tiny-text", "--data", str(path), "--out", str(tmp_path / "txt")) == 0
    state = json.loads((tmp_path / "img" / "cache.json").read_text())
    assert state["key_fields"]["dtype"] == "fp32" and state["key_fields"]["tokens"] is True
    assert state["parts"]["image"]["token_dim"] == 16 and state["source"] == str(path)
    assert sorted(f.name for f in (tmp_path / "img").glob("*.safetensors")) == [
        f"image-0000{i}.safetensors" for i in range(3)
    ]
    feats = load_paired_features(tmp_path / "img", tmp_path / "txt")
    assert feats.image_tokens is not None and feats.image_tokens.shape == (7, 16, 16)
    assert feats.text_to_image.tolist() == list(tiny_manifest.text_to_image)
    assert torch.isfinite(feats.text).all() and feats.text.shape == (15, 16)


def test_builtin_spec_with_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSALIGN_DATA", str(_fake_root(tmp_path)))
    assert encode("--encoder", "tiny-text", "--data", "flickr8k:train:2", "--out", str(tmp_path / "t")) == 0
    state = json.loads((tmp_path / "t" / "cache.json").read_text())
    assert state["source"] == "flickr8k:train:2" and state["parts"]["text"]["count"] == 4


def test_errors_are_one_line_for_people(
    tiny_manifest: ImageTextManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_manifest(tiny_manifest, tmp_path / "m.tsv")
    assert encode("--encoder", "nope", "--data", str(path), "--out", str(tmp_path / "x")) == 1
    assert "csalign encode: error: unknown encoder 'nope'" in capsys.readouterr().err
    out = str(tmp_path / "img")
    assert encode("--encoder", "tiny-image", "--data", str(path), "--out", out) == 0
    assert encode("--encoder", "tiny-image", "--data", str(path), "--out", out, "--dtype", "fp32") == 1
    assert "dtype: cache has 'fp16', expected 'fp32'" in capsys.readouterr().err
    assert encode("--encoder", "tiny-image", "--data", str(path), "--out", out, "--dtype", "fp32", "--overwrite") == 0


def test_bad_image_policy_flag(
    tiny_manifest: ImageTextManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path(tiny_manifest.image_paths[2]).write_bytes(b"\xff\xd8 truncated")
    path = write_manifest(tiny_manifest, tmp_path / "m.tsv")
    assert encode("--encoder", "tiny-image", "--data", str(path), "--out", str(tmp_path / "a")) == 1
    assert "1 of 7 images could not be read" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="img002.jpg"):
        rc = encode(
            "--encoder", "tiny-image", "--data", str(path), "--out", str(tmp_path / "b"), "--on-bad-image", "skip"
        )
    assert rc == 0
    assert "image: 6 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "cache.json").read_text())["skipped_images"][0]["row"] == 2
