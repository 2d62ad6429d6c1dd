"""Feature cache: round trip against direct encoding, keys, resume, integrity, bad images, loaders."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from csaligner.data import (
    BadImageError,
    CacheIntegrityError,
    CacheKeyError,
    EncodeConfig,
    FeatureCache,
    ImageTextManifest,
    encode_manifest,
    load_class_features,
    load_paired_features,
    read_class_folders,
)
from csaligner.encoders import EncoderOutput, get_encoder
from csaligner.encoders.tiny import TinyImageEncoder, TinyTextEncoder

FAST = EncodeConfig(batch_size=3, shard_size=4, progress=False)


class Counting:
    """Wraps an encoder: counts the rows it encodes and can fail after `fail_after` calls."""

    def __init__(self, inner: Any, fail_after: int | None = None) -> None:
        self.inner, self.fail_after, self.calls, self.rows = inner, fail_after, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _tick(self, n: int) -> None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.rows += n

    def encode_images(self, images: Any, tokens: bool = False) -> EncoderOutput:
        self._tick(len(images))
        return self.inner.encode_images(images, tokens=tokens)

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        self._tick(len(texts))
        return self.inner.encode_texts(texts, tokens=tokens)


def build(m: ImageTextManifest, tmp: Path, cfg: EncodeConfig = FAST) -> tuple[Path, Path]:
    img, txt = tmp / "img", tmp / "txt"
    encode_manifest(TinyImageEncoder(), m, img, cfg)
    encode_manifest(TinyTextEncoder(), m, txt, cfg)
    return img, txt


def test_round_trip_matches_direct_encoding(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    cfg = replace(FAST, tokens=True, dtype="fp32")
    feats = load_paired_features(*build(tiny_manifest, tmp_path, cfg))
    m = tiny_manifest
    assert feats.image_ids == list(m.image_ids) and feats.captions == list(m.captions)
    assert feats.text_to_image.tolist() == list(m.text_to_image)
    from PIL import Image

    direct_img = TinyImageEncoder().encode_images([Image.open(p) for p in m.image_paths], tokens=True)
    torch.testing.assert_close(feats.image, direct_img.pooled)
    torch.testing.assert_close(feats.image_tokens, direct_img.tokens)
    assert feats.image_token_mask is not None and feats.image_token_mask.all()
    # Captions were encoded in length-sorted batches; each row must still be its own caption.
    enc = TinyTextEncoder()
    for j, cap in enumerate(m.captions):
        one = enc.encode_texts([cap], tokens=True)
        torch.testing.assert_close(feats.text[j], one.pooled[0])
        n = int(one.mask.sum())
        assert feats.text_token_mask is not None and feats.text_tokens is not None
        assert int(feats.text_token_mask[j].sum()) == n
        torch.testing.assert_close(feats.text_tokens[j, :n], one.tokens[0, :n])


def test_fp16_storage_and_layout(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    img, txt = build(tiny_manifest, tmp_path)
    assert sorted(p.name for p in img.iterdir()) == [
        "cache.json",
        "image-00000.safetensors",
        "image-00001.safetensors",
        "items.json",
    ]
    state = json.loads((txt / "cache.json").read_text())
    assert state["complete"] and state["parts"]["text"]["count"] == tiny_manifest.num_texts == 15
    assert len(state["parts"]["text"]["shards"]) == 4  # 15 captions / shard_size 4
    cache = FeatureCache.open(img)
    assert cache.pooled("image").dtype == torch.float16
    feats = load_paired_features(img, txt)
    assert feats.image.dtype == torch.float32 and feats.image_tokens is None
    assert load_paired_features(img, txt, dtype=None).text.dtype == torch.float16


def test_key_mismatch_is_an_error_never_reuse(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "img"
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    with pytest.raises(CacheKeyError, match="dtype: cache has 'fp16', expected 'fp32'"):
        encode_manifest(TinyImageEncoder(), tiny_manifest, out, replace(FAST, dtype="fp32"))
    with pytest.raises(CacheKeyError, match="encoder: cache has 'tiny-image@seed0-v1'"):
        encode_manifest(TinyImageEncoder(seed=1), tiny_manifest, out, FAST)
    with pytest.raises(CacheKeyError, match="manifest"):
        encode_manifest(TinyImageEncoder(), tiny_manifest.head(3), out, FAST)
    with pytest.raises(CacheKeyError, match="other settings"):
        FeatureCache.open(out, expected_key="0" * 64)
    cache = encode_manifest(TinyImageEncoder(), tiny_manifest, out, replace(FAST, dtype="fp32", overwrite=True))
    assert cache.pooled("image").dtype == torch.float32


def test_rerun_with_same_key_reuses_without_encoding(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "txt"
    first = encode_manifest(TinyTextEncoder(), tiny_manifest, out, FAST).pooled("text")
    enc = Counting(TinyTextEncoder())
    again = encode_manifest(enc, tiny_manifest, out, FAST)
    assert enc.rows == 0
    torch.testing.assert_close(again.pooled("text"), first)


@pytest.mark.parametrize("part", ["image", "text"])
def test_resume_encodes_only_missing_shards(tiny_manifest: ImageTextManifest, tmp_path: Path, part: str) -> None:
    make = TinyImageEncoder if part == "image" else TinyTextEncoder
    total = tiny_manifest.num_images if part == "image" else tiny_manifest.num_texts
    cfg = replace(FAST, batch_size=2, shard_size=4)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        encode_manifest(Counting(make(), fail_after=3), tiny_manifest, out, cfg)
    state = json.loads((out / "cache.json").read_text())
    done = sum(s["stop"] - s["start"] for s in state["parts"][part]["shards"].values())
    assert not state["complete"] and 0 < done < total
    with pytest.raises(CacheIntegrityError, match="incomplete"):
        FeatureCache.open(out)
    resumed = Counting(make())
    cache = encode_manifest(resumed, tiny_manifest, out, cfg)
    assert resumed.rows == total - done
    clean = encode_manifest(make(), tiny_manifest, tmp_path / "clean", cfg)
    torch.testing.assert_close(cache.pooled(part), clean.pooled(part))


def test_an_interrupt_with_decoding_workers_ends_them_and_resumes(
    tiny_manifest: ImageTextManifest, tmp_path: Path
) -> None:
    """Ctrl-C while DataLoader workers decode images: no worker outlives the interrupt, and a rerun
    with the same workers finishes the cache with the rows it lacked, matching one made in one go."""
    import multiprocessing

    cfg = replace(FAST, batch_size=2, shard_size=4, workers=2)
    out = tmp_path / "c"
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        encode_manifest(Counting(TinyImageEncoder(), fail_after=3), tiny_manifest, out, cfg)
    assert set(multiprocessing.active_children()) <= before, "decoding workers outlived the interrupt"
    shards = json.loads((out / "cache.json").read_text())["parts"]["image"]["shards"].values()
    done = sum(s["stop"] - s["start"] for s in shards)
    assert 0 < done < tiny_manifest.num_images
    resumed = Counting(TinyImageEncoder())
    cache = encode_manifest(resumed, tiny_manifest, out, cfg)
    assert resumed.rows == tiny_manifest.num_images - done
    clean = encode_manifest(TinyImageEncoder(), tiny_manifest, tmp_path / "clean", replace(cfg, workers=0))
    torch.testing.assert_close(cache.pooled("image"), clean.pooled("image"))


def test_shard_renamed_before_crash_is_adopted(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "c"
    encode_manifest(TinyTextEncoder(), tiny_manifest, out, FAST)
    state = json.loads((out / "cache.json").read_text())
    state["complete"] = False
    del state["parts"]["text"]["shards"]["1"]  # as if the process died between rename and the JSON update
    (out / "cache.json").write_text(json.dumps(state))
    enc = Counting(TinyTextEncoder())
    encode_manifest(enc, tiny_manifest, out, FAST)
    assert enc.rows == 0


def test_altered_or_missing_shard_fails_verification(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "c"
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    shard = out / "image-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheIntegrityError, match="sha256"):
        FeatureCache.open(out)
    FeatureCache.open(out, verify=False)  # counts still fine; checksum skipped on request
    shard.unlink()
    with pytest.raises(CacheIntegrityError, match=r"shard image-00001\.safetensors is missing"):
        FeatureCache.open(out, verify=False)
    items = json.loads((out / "items.json").read_text())
    items["image_ids"][0] = "renamed.jpg"
    (out / "items.json").write_text(json.dumps(items))
    with pytest.raises(CacheIntegrityError, match=r"items\.json does not match"):
        FeatureCache.open(out, verify=False)


def _with_bad_images(m: ImageTextManifest, tmp_path: Path) -> ImageTextManifest:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    paths = list(m.image_paths)
    paths[1], paths[4] = str(garbage), str(tmp_path / "does-not-exist.jpg")
    return replace(m, image_paths=tuple(paths))


def test_bad_images_fail_lists_all_of_them(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    m = _with_bad_images(tiny_manifest, tmp_path)
    with pytest.raises(BadImageError, match="2 of 7 images could not be read") as info:
        encode_manifest(TinyImageEncoder(), m, tmp_path / "c", FAST)
    assert "garbage.jpg" in str(info.value) and "does-not-exist.jpg: file not found" in str(info.value)
    assert [b.row for b in info.value.bad] == [1, 4]
    assert not (tmp_path / "c").exists()


def test_bad_images_skip_reports_and_drops_their_captions(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    m = _with_bad_images(tiny_manifest, tmp_path)
    with pytest.warns(UserWarning, match="2 of 7 images could not be read") as caught:
        cache = encode_manifest(TinyImageEncoder(), m, tmp_path / "img", replace(FAST, on_bad_image="skip"))
    lines = str(caught[0].message).splitlines()
    assert lines[0] == "2 of 7 images could not be read and will be left out of the cache:"  # a sentence
    assert "garbage.jpg" in lines[1] and "does-not-exist.jpg: file not found" in lines[2]
    assert lines[3].startswith("fix or replace them and encode again with --overwrite")
    assert [s["image_id"] for s in cache.skipped_images] == ["img001.jpg", "img004.jpg"]
    assert cache.rows("image") == [0, 2, 3, 5, 6]
    encode_manifest(TinyTextEncoder(), m, tmp_path / "txt", FAST)
    with pytest.warns(UserWarning, match="dropping their 4 captions"):
        feats = load_paired_features(tmp_path / "img", tmp_path / "txt")
    assert feats.num_images == 5 and feats.num_texts == m.num_texts - 4
    assert feats.meta["dropped_captions"] == 4 and feats.meta["skipped_images"] == ["img001.jpg", "img004.jpg"]
    # Every surviving caption still points at its own image.
    for j, cap in enumerate(feats.captions):
        k = m.captions.index(cap)
        assert (feats.text_to_image[j] == -1) == (m.text_to_image[k] == -1)
        if m.text_to_image[k] >= 0:
            assert feats.image_ids[feats.text_to_image[j]] == m.image_ids[m.text_to_image[k]]


def test_paired_loader_refuses_caches_of_different_data(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    encode_manifest(TinyImageEncoder(), tiny_manifest, tmp_path / "img", FAST)
    encode_manifest(TinyTextEncoder(), tiny_manifest.head(4), tmp_path / "txt", FAST)
    with pytest.raises(ValueError, match="different data"):
        load_paired_features(tmp_path / "img", tmp_path / "txt")
    with pytest.raises(ValueError, match="no text features"):
        load_paired_features(tmp_path / "img", tmp_path / "img")


def test_class_features(class_root: Path, tmp_path: Path) -> None:
    m = read_class_folders(class_root)
    encode_manifest(TinyImageEncoder(), m, tmp_path / "c", FAST)
    feats, labels, names = load_class_features(tmp_path / "c")
    assert names == ["daisy", "roses", "tulips"]
    assert feats.shape == (9, 16) and labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="no captions"):
        encode_manifest(TinyTextEncoder(), m, tmp_path / "t", FAST)


def test_class_loader_refuses_caption_sets(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    encode_manifest(TinyImageEncoder(), tiny_manifest, tmp_path / "c", FAST)
    with pytest.raises(ValueError, match="no class labels"):
        load_class_features(tmp_path / "c")


class TinyDual:
    """A 'both' encoder (like CLIP) made of the two tiny towers."""

    modality = "both"

    def __init__(self) -> None:
        self.img, self.txt = TinyImageEncoder(), TinyTextEncoder()
        self.id, self.embed_dim, self.token_dim = "tiny-dual@v1", 16, 16
        self.image_preprocess, self.text_max_length = self.img.image_preprocess, self.txt.text_max_length

    def encode_images(self, images: Any, tokens: bool = False) -> EncoderOutput:
        return self.img.encode_images(images, tokens)

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        return self.txt.encode_texts(texts, tokens)


def test_dual_encoder_writes_both_parts_in_one_folder(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    cache = encode_manifest(TinyDual(), tiny_manifest, tmp_path / "c", FAST)
    assert cache.parts == ("image", "text")
    feats = load_paired_features(tmp_path / "c", tmp_path / "c")
    assert feats.num_images == 7 and feats.num_texts == 15


def test_decoding_workers_give_identical_features(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    a = encode_manifest(TinyImageEncoder(), tiny_manifest, tmp_path / "a", FAST).pooled("image")
    b = encode_manifest(TinyImageEncoder(), tiny_manifest, tmp_path / "b", replace(FAST, workers=2)).pooled("image")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encode_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        EncodeConfig(dtype="bf8")
    with pytest.raises(ValueError, match="on_bad_image"):
        EncodeConfig(on_bad_image="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        EncodeConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be an integer >= 1, got True"):
        EncodeConfig(batch_size=True)  # bool is an int subclass: it encoded one item per call
    with pytest.raises(ValueError, match=r"workers \(--workers\) must be an integer >= 0, got 1\.5"):
        EncodeConfig(workers=1.5)  # type: ignore[arg-type]


def test_registry_tiny_encoders_match_classes() -> None:
    assert get_encoder("tiny-image").id == TinyImageEncoder().id
    assert get_encoder("tiny-text").id == TinyTextEncoder().id


def test_rebuilt_cache_has_byte_identical_shards(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    # The shards' sha256 go into cache.json; safetensors wrote the metadata keys (key, part, start, stop)
    # in a random order per file, so rebuilding the same cache gave other bytes and other checksums.
    first = build(tiny_manifest, tmp_path / "a")
    second = build(tiny_manifest, tmp_path / "b")
    for one, two in zip(first, second, strict=True):
        shards = sorted(p.name for p in one.glob("*.safetensors"))
        assert len(shards) >= 2 and shards == sorted(p.name for p in two.glob("*.safetensors"))
        for name in shards:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        recorded = [json.loads((d / "cache.json").read_text())["parts"] for d in (one, two)]
        assert recorded[0] == recorded[1]  # same sha256 per shard


class Scaled(Counting):
    """Multiplies the wrapped text encoder's features by `scale` (1e6: beyond fp16; nan: a broken encoder)."""

    def __init__(self, inner: Any, scale: float) -> None:
        super().__init__(inner)
        self.scale = scale

    def encode_texts(self, texts: Sequence[str], tokens: bool = False) -> EncoderOutput:
        out = self.inner.encode_texts(texts, tokens=tokens)
        scaled = None if out.tokens is None else out.tokens * self.scale
        return EncoderOutput(out.pooled * self.scale, scaled, out.mask)


@pytest.mark.parametrize(
    ("scale", "message"),
    [(1e6, r"pooled features reach .* beyond what torch.float16 stores.*--dtype fp32"), (float("nan"), "NaN or inf")],
)
def test_non_finite_features_are_never_stored(
    tiny_manifest: ImageTextManifest, tmp_path: Path, scale: float, message: str
) -> None:
    with pytest.raises(FloatingPointError, match=message):
        encode_manifest(Scaled(TinyTextEncoder(), scale), tiny_manifest, tmp_path / "c", FAST)
    assert not list((tmp_path / "c").glob("*.safetensors"))
    if scale == 1e6:  # fp32 holds them
        cache = encode_manifest(
            Scaled(TinyTextEncoder(), scale), tiny_manifest, tmp_path / "d", replace(FAST, dtype="fp32")
        )
        assert bool(torch.isfinite(cache.pooled("text")).all())


def test_cache_files_have_the_umask_mode(tiny_manifest: ImageTextManifest, tmp_path: Path, known_umask: int) -> None:
    # mkstemp (cache.json) and safetensors (shards) create 0600; a cache shared on a cluster must be
    # readable by others as the umask allows, like every other file the tool writes.
    want = oct(0o666 & ~known_umask)
    for folder in build(tiny_manifest, tmp_path):
        files = sorted(folder.iterdir())
        names = {p.name for p in files}
        assert {"cache.json", "items.json"} <= names and any(n.endswith(".safetensors") for n in names)
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: want for p in files}


def test_the_writer_still_imports_from_its_old_module() -> None:
    """CacheWriter moved to cache_writer.py; code that imported it from csaligner.data.cache keeps working."""
    from csaligner.data import cache, cache_writer

    assert cache.CacheWriter is cache_writer.CacheWriter
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        _ = cache.NoSuchName  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["cache.json", "items.json"])
@pytest.mark.parametrize("text", ["{broken", "", "[1, 2]"])
def test_damaged_json_names_the_file_and_the_fix(
    tiny_manifest: ImageTextManifest, tmp_path: Path, name: str, text: str
) -> None:
    out = tmp_path / "c"
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    (out / name).write_text(text)
    with pytest.raises(CacheIntegrityError, match=rf"{name}.*damaged.*--overwrite") as err:
        FeatureCache.open(out)
    assert str(out) in str(err.value)


def test_missing_items_or_cache_fields_name_the_fix(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "c"
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    state = json.loads((out / "cache.json").read_text())
    (out / "items.json").unlink()
    with pytest.raises(CacheIntegrityError, match=r"has no items\.json.*--overwrite"):
        FeatureCache.open(out)
    del state["parts"]
    (out / "cache.json").write_text(json.dumps(state))
    with pytest.raises(CacheIntegrityError, match=r"lacks \['parts'\].*--overwrite"):
        FeatureCache.open(out)


def test_encoding_into_a_damaged_cache_asks_for_overwrite(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    out = tmp_path / "c"
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    (out / "cache.json").write_text("{broken")
    with pytest.raises(CacheIntegrityError, match=r"cache\.json is damaged.*--overwrite"):
        encode_manifest(TinyImageEncoder(), tiny_manifest, out, FAST)
    encode_manifest(TinyImageEncoder(), tiny_manifest, out, replace(FAST, overwrite=True))
    assert FeatureCache.open(out).manifest.num_images == tiny_manifest.num_images


def _poison_row(cache_dir: Path, row: int) -> None:
    """Write NaN into one pooled row of the first shard and re-record its checksum (as a foreign writer would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from csaligner.data.cache import file_sha256

    state = json.loads((cache_dir / "cache.json").read_text())
    part = next(iter(state["parts"].values()))
    shard = next(s for s in part["shards"].values() if s["start"] == 0)
    path = cache_dir / shard["file"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["pooled"][row, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    shard["sha256"] = file_sha256(path)
    (cache_dir / "cache.json").write_text(json.dumps(state))


def test_non_finite_rows_name_the_cache_and_the_items(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    img, txt = build(tiny_manifest, tmp_path)
    _poison_row(img, 1)
    with pytest.raises(ValueError, match=r"img: 1 of \d+ image feature vectors hold NaN or Inf: row 1 \(img001\.jpg\)"):
        load_paired_features(img, txt)
    clean_img, _ = build(tiny_manifest, tmp_path / "clean")
    _poison_row(txt, 0)
    caption = re.escape(repr(tiny_manifest.captions[0]))
    with pytest.raises(ValueError, match=rf"txt: 1 of \d+ text feature vectors.*row 0 \({caption}\)"):
        load_paired_features(clean_img, txt)


def test_non_finite_class_rows_name_the_cache(class_root: Path, tmp_path: Path) -> None:
    m = read_class_folders(class_root)
    out = tmp_path / "cls"
    encode_manifest(TinyImageEncoder(), m, out, FAST)
    _poison_row(out, 2)
    with pytest.raises(ValueError, match=rf"cls: 1 of \d+ image feature vectors.*row 2 \({m.image_ids[2]}\)"):
        load_class_features(out)


def test_a_data_spec_given_as_a_cache_says_how_to_make_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"a --data spec is not a cache: csalign encode --data flickr8k:dev"):
        FeatureCache.open("flickr8k:dev")
    with pytest.raises(FileNotFoundError) as err:
        FeatureCache.open(tmp_path / "missing")
    assert "--data spec" not in str(err.value)  # a plain missing folder gets no such hint
