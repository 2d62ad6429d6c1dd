"""`csalign encode` end to end on tiny data: exit codes, files written, numbers inside them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
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
    rc = encode("--encoder", "tiny-image", "--data", str(path), "--out", str(tmp_path / "img"), "--tokens",
                "--shard-size", "3", "--dtype", "fp32")  # fmt: skip
    assert rc == 0  # a rerun: said plainly, not "encoded 0 now in 0.0s (0.0/s)"
    assert "image: 7 rows, dim 16, 3 shards; all already encoded with these settings, nothing to do" in (
        capsys.readouterr().out
    )
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


def test_encode_counts_image_only_and_text_only_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows with an empty caption or image become unpaired ones (see data.manifest): encode says how many."""
    from .conftest import write_jpegs

    a, b, c = (p.name for p in write_jpegs(tmp_path, 3))
    rows = [f"{a}\ta dog", f"{a}\ta dog runs", f"{b}\t", f"{c}\t", "\ta caption without an image"]
    (tmp_path / "m.tsv").write_text("image\tcaption\n" + "\n".join(rows) + "\n")
    assert encode("--encoder", "tiny-text", "--data", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "t")) == 0
    out = capsys.readouterr().out
    assert "data: 3 images, 3 captions; unpaired: 2 image-only (images without a caption" in out
    assert "1 text-only (captions without an image" in out
    (tmp_path / "paired.tsv").write_text(f"image\tcaption\n{a}\ta dog\n{b}\ta cat\n")
    assert encode("--encoder", "tiny-image", "--data", str(tmp_path / "paired.tsv"), "--out", str(tmp_path / "i")) == 0
    assert "data: 2 images, 2 captions; every image has a caption and every caption an image" in capsys.readouterr().out


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


@pytest.fixture
def tiny_bert_folder(tmp_path: Path) -> Path:
    """A tiny random BERT saved like a hub folder (what hf-text:<dir> loads)."""
    pytest.importorskip("transformers")
    from transformers import BertModel

    from tests.encoders.conftest import save_tokenizer, tiny_bert_config

    folder = tmp_path / "bert"
    BertModel(tiny_bert_config()).save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder


def hf_progress_state() -> tuple[bool, bool, int]:
    """(transformers bars on, huggingface_hub bars off, transformers log level): what --quiet must not change."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity()


@pytest.mark.parametrize("loader", ["hf-text", "sentence-transformers"])
def test_quiet_silences_the_model_libraries_too(
    loader: str, tiny_manifest: ImageTextManifest, tiny_bert_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """transformers 5 draws a "Loading weights" bar for every model it loads; --quiet hides it, and only for the run."""
    import transformers

    if loader == "sentence-transformers":
        pytest.importorskip("sentence_transformers")
        from tests.encoders.test_hf_loaders import write_sentence_transformers_folder

        folder = write_sentence_transformers_folder(tiny_bert_folder, tmp_path / "st")
    else:
        folder = tiny_bert_folder
    data = str(write_manifest(tiny_manifest, tmp_path / "m.jsonl"))
    before = hf_progress_state()
    assert encode("--encoder", f"{loader}:{folder}", "--data", data, "--out", str(tmp_path / "quiet")) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_progress_state() == before  # nothing left switched off for the rest of the process
    args = ["encode", "--encoder", f"{loader}:{folder}", "--data", data, "--out", str(tmp_path / "loud")]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "encode texts [" in err  # without --quiet, bars as before
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert "Loading weights" in err  # so the quiet run above could have shown it


def test_quiet_keeps_bars_off_that_were_off(
    tiny_manifest: ImageTextManifest, tiny_bert_folder: Path, tmp_path: Path
) -> None:
    """A caller that switched the libraries' bars off finds them still off after a quiet encode."""
    from transformers.utils import logging as hf_logging

    data = str(write_manifest(tiny_manifest, tmp_path / "m.jsonl"))
    hf_logging.disable_progress_bar()
    try:
        before = hf_progress_state()
        assert encode("--encoder", f"hf-text:{tiny_bert_folder}", "--data", data, "--out", str(tmp_path / "q")) == 0
        assert hf_progress_state() == before and before[:2] == (False, True)
    finally:
        hf_logging.enable_progress_bar()


# A fresh interpreter: which Hugging Face libraries a quiet encode imported, and their state after it.
QUIET_ENCODE = """
import sys
from csaligner.cli import main
for encoder in sys.argv[3:]:
    assert main(["encode", "--quiet", "--encoder", encoder, "--data", sys.argv[1], "--out", sys.argv[2] + encoder]) == 0
libs = [m for m in ("transformers", "huggingface_hub", "sentence_transformers", "diffusers") if m in sys.modules]
print("IMPORTED", ",".join(libs) or "-")
if "transformers" in sys.modules:
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging
    print("STATE", hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity())
"""


def quiet_encode_in_a_fresh_process(data: Path, out: Path, *encoders: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    quiet_vars = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY")  # library defaults
    env = {**{k: v for k, v in os.environ.items() if k not in quiet_vars}, "PYTHONPATH": src}
    argv = [sys.executable, "-c", QUIET_ENCODE, str(data), str(out), *encoders]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_quiet_encode_with_tiny_encoders_imports_no_model_library(
    tiny_manifest: ImageTextManifest, tmp_path: Path
) -> None:
    """Quieting transformers must not cost its import (a second or more) when the encoder never uses it."""
    data = write_manifest(tiny_manifest, tmp_path / "m.jsonl")
    done = quiet_encode_in_a_fresh_process(data, tmp_path / "cache-", "tiny-image", "tiny-text")
    assert "IMPORTED -" in done.stdout, done.stdout
    assert (tmp_path / "cache-tiny-text" / "cache.json").is_file() and "it/s" not in done.stderr


def test_quiet_silences_a_model_library_first_imported_by_the_encoder(
    tiny_manifest: ImageTextManifest, tiny_bert_folder: Path, tmp_path: Path
) -> None:
    """The loader imports transformers inside the quiet block: its bars are off, and back on after the run."""
    data = write_manifest(tiny_manifest, tmp_path / "m.jsonl")
    done = quiet_encode_in_a_fresh_process(data, tmp_path / "cache-", f"hf-text:{tiny_bert_folder}")
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr, done.stderr
    assert "IMPORTED transformers,huggingface_hub" in done.stdout
    assert f"STATE True False {logging.WARNING}" in done.stdout  # the libraries' defaults, as if never quieted


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "batch_size (--batch-size) must be an integer >= 1, got 0"),
        ("--shard-size", "-1", "shard_size (--shard-size) must be an integer >= 1, got -1"),
        ("--workers", "-1", "workers (--workers) must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_size_flag_is_named_as_the_flag_too(
    flag: str, value: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error said "batch_size must be ...": a name from EncodeConfig that the command line never shows."""
    manifest = tmp_path / "m.tsv"
    manifest.write_text("image\tcaption\na.jpg\ta dog runs\n")
    args = ("--encoder", "tiny-text", "--data", str(manifest), "--out", str(tmp_path / "c"), "--quiet")
    assert encode(*args, flag, value) == 1
    assert f"csalign encode: error: {expected}" in capsys.readouterr().err
