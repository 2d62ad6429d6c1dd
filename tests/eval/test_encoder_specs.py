"""Caches and runs record how to load their encoders again (a spec with absolute paths), not only the ids.

Encoders built from a folder ("hf-text:<dir>") have ids naming their weights, not where they are: without
the spec, preview, generate and zero-shot prompts could not encode text for runs trained on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.eval.tiny_runs import WORDS, encode, write_images

from csaligner.data import load_paired_features
from csaligner.data.cache import FeatureCache
from csaligner.data.manifest import ImageTextManifest, write_manifest
from csaligner.decode.preview_runs import run_text_encoder, run_text_encoder_id
from csaligner.encoders import encoder_spec, get_encoder, register_encoder, unregister_encoder
from csaligner.encoders.tiny import TinyTextEncoder
from csaligner.eval.evaluate import ClassificationData, check_classification_encoders, check_run_encoders
from csaligner.train.embed import encode_texts
from csaligner.train.model import run_encoders, write_run_encoders


@pytest.fixture
def folder_text_encoder() -> Iterator[None]:
    """ "tiny-dir:<folder>": the tiny text encoder, its id hashing the folder's seed.txt (like hf-text's weights)."""

    def build(folder: str, *, device: str = "cpu") -> TinyTextEncoder:
        seed = (Path(folder) / "seed.txt").read_text()
        enc = TinyTextEncoder(seed=int(seed), device=device)
        enc._id = f"tiny-dir@{hashlib.sha256(seed.encode()).hexdigest()[:8]}"
        return enc

    register_encoder("tiny-dir", takes_arg=True)(build)
    try:
        yield
    finally:
        unregister_encoder("tiny-dir")


def test_get_encoder_records_the_spec_with_absolute_paths(
    folder_text_encoder: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "seed.txt").write_text("3")
    monkeypatch.chdir(tmp_path)
    assert encoder_spec(get_encoder("tiny-dir:weights")) == f"tiny-dir:{tmp_path / 'weights'}"
    assert encoder_spec(get_encoder("tiny-text")) == "tiny-text"


def test_a_run_on_a_folder_encoder_encodes_prompts_from_its_folder(
    folder_text_encoder: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "seed.txt").write_text("3")
    paths = write_images(tmp_path / "images", 4, seed=0)
    manifest = ImageTextManifest(
        image_ids=tuple(p.name for p in paths),
        image_paths=tuple(str(p) for p in paths),
        captions=tuple(WORDS[: len(paths)]),
        text_to_image=tuple(range(len(paths))),
        name="tiny",
    )
    data = str(write_manifest(manifest, tmp_path / "m.jsonl"))
    monkeypatch.chdir(tmp_path)  # a relative folder, as a user types it
    encode("--encoder", "tiny-image", "--data", data, "--out", "img")
    encode("--encoder", "tiny-dir:weights", "--data", data, "--out", "txt")
    assert FeatureCache.open(tmp_path / "txt").encoder_spec == f"tiny-dir:{weights}"
    run = tmp_path / "run"
    run.mkdir()
    write_run_encoders(str(run), load_paired_features(tmp_path / "img", tmp_path / "txt").meta)
    monkeypatch.chdir(run)  # preview / generate run from anywhere
    assert run_text_encoder(run) == f"tiny-dir:{weights}"
    assert run_encoders(str(run))["image_encoder_spec"] == "tiny-image"
    expect = run_text_encoder_id(run)
    assert expect is not None and encode_texts(["a dog"], run_text_encoder(run), expect_id=expect).pooled.shape[0] == 1


def test_prompts_from_changed_weights_are_refused(folder_text_encoder: None, tmp_path: Path) -> None:
    (tmp_path / "seed.txt").write_text("3")
    trained_id = get_encoder(f"tiny-dir:{tmp_path}").id
    (tmp_path / "seed.txt").write_text("4")  # the folder now holds other weights
    with pytest.raises(ValueError, match=r"now loads 'tiny-dir@.*trained on features of 'tiny-dir@.*weights changed"):
        encode_texts(["a dog"], f"tiny-dir:{tmp_path}", expect_id=trained_id)


def test_caches_from_before_the_spec_fall_back_to_the_name_in_the_id(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 2, seed=0)
    manifest = ImageTextManifest(
        image_ids=tuple(p.name for p in paths),
        image_paths=tuple(str(p) for p in paths),
        captions=("a", "b"),
        text_to_image=(0, 1),
        name="tiny",
    )
    data = str(write_manifest(manifest, tmp_path / "m.jsonl"))
    encode("--encoder", "tiny-text", "--data", data, "--out", str(tmp_path / "txt"))
    cache = FeatureCache.open(tmp_path / "txt")
    del cache.state["encoder_spec"]
    assert cache.encoder_spec == "tiny-text"


@pytest.fixture
def at_named_encoder() -> Iterator[str]:
    """ "tiny@v2": a registered name holding "@", so its ids ("tiny@v2@seed3-v1") hold two."""

    def build(*, device: str = "cpu") -> TinyTextEncoder:
        enc = TinyTextEncoder(seed=3, device=device)
        enc._id = "tiny@v2@seed3-v1"
        return enc

    register_encoder("tiny@v2")(build)
    try:
        yield "tiny@v2@seed3-v1"
    finally:
        unregister_encoder("tiny@v2")


def test_a_name_holding_an_at_is_read_back_from_the_id_whole(at_named_encoder: str, tmp_path: Path) -> None:
    """The fingerprint after the last "@" is the encoder's own; everything before it is the name."""
    manifest = ImageTextManifest(image_ids=("a",), image_paths=("/a.jpg",), captions=("a",), text_to_image=(0,))
    data = str(write_manifest(manifest, tmp_path / "m.jsonl"))
    encode("--encoder", "tiny@v2", "--data", data, "--out", str(tmp_path / "txt"))
    cache = FeatureCache.open(tmp_path / "txt")
    assert cache.key_fields["encoder"] == at_named_encoder
    del cache.state["encoder_spec"]  # a cache from before the spec was recorded
    assert cache.encoder_spec == "tiny@v2"
    run = tmp_path / "run"
    run.mkdir()
    write_run_encoders(str(run), {"text_encoder": at_named_encoder})  # a run from before the spec, too
    assert run_text_encoder(run) == "tiny@v2"
    one = torch.zeros(1, 4)
    prompts = ClassificationData(one, torch.zeros(1), one, torch.zeros(1), ["a"], text_encoder="tiny@v2")
    check_classification_encoders(run, prompts)  # the same encoder: no error
    with pytest.raises(ValueError, match=r"\(csalign encode --encoder tiny@v2 \.\.\.\)"):
        check_run_encoders(run, {"text_encoder": "tiny-text@seed0-b512-v1"})
