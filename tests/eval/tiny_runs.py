"""Tiny on-disk caches (tiny-image / tiny-text encoders) and hand-built run folders for CLI tests.

A run folder is what `csalign eval` and `csalign preview --run` read: image/text adapter files and a
config.yaml. Building it by hand (no training) keeps these tests at well under a second each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from csaligner.cli import main
from csaligner.data import ImageTextManifest, write_manifest
from csaligner.encoders import register_encoder, unregister_encoder
from csaligner.encoders.tiny import TinyImageEncoder, TinyTextEncoder

WORDS = ("a", "dog", "cat", "runs", "jumps", "on", "the", "grass", "beach", "red", "blue", "ball")
OUT_DIM = 12


@dataclass(frozen=True)
class TinyCaches:
    image: Path
    """tiny-image cache of the paired set."""
    text: Path
    """tiny-text cache, pooled features only."""
    text_tokens: Path
    """tiny-text cache encoded with --tokens."""
    image_paths: list[Path]
    image_ids: list[str]


@contextmanager
def other_tiny_encoders() -> Iterator[None]:
    """Register "tiny-image-b" and "tiny-text-b": the tiny encoders' widths (16) with other weights and ids.

    Same-width encoders are the dangerous case: features from them fit a run's adapters, so only the
    recorded encoder ids can tell that they are the wrong ones.
    """

    def image(*, device: str = "cpu") -> TinyImageEncoder:
        enc = TinyImageEncoder(seed=1, device=device)
        enc._id = "tiny-image-b@seed1-v1"
        return enc

    def text(*, device: str = "cpu") -> TinyTextEncoder:
        enc = TinyTextEncoder(seed=1, device=device)
        enc._id = "tiny-text-b@seed1-b512-v1"
        return enc

    register_encoder("tiny-image-b")(image)
    register_encoder("tiny-text-b")(text)
    try:
        yield
    finally:
        unregister_encoder("tiny-image-b")
        unregister_encoder("tiny-text-b")


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    """n random 32x32 PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def encode(*args: str) -> None:
    assert main(["encode", "--quiet", *args]) == 0


def tiny_caches(root: Path, n_images: int = 10) -> TinyCaches:
    """n_images images with 2 captions each, encoded with the tiny encoders (text with and without tokens)."""
    paths = write_images(root / "images", n_images, seed=0)
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(2 * n_images)]
    manifest = ImageTextManifest(
        image_ids=tuple(p.name for p in paths),
        image_paths=tuple(str(p) for p in paths),
        captions=tuple(captions),
        text_to_image=tuple(i // 2 for i in range(2 * n_images)),
        name="tiny",
    )
    data = str(write_manifest(manifest, root / "m.jsonl"))
    caches = TinyCaches(root / "img", root / "txt", root / "txt-tok", paths, [p.name for p in paths])
    encode("--encoder", "tiny-image", "--data", data, "--out", str(caches.image))
    encode("--encoder", "tiny-text", "--data", data, "--out", str(caches.text))
    encode("--encoder", "tiny-text", "--data", data, "--out", str(caches.text_tokens), "--tokens")
    return caches


def class_caches(
    root: Path,
    per_class: tuple[int, ...] = (4, 4, 5),
    encoder: str = "tiny-image",
    names: tuple[str, ...] = ("daisy", "roses", "tulips"),
) -> tuple[Path, Path]:
    """Class-folder train and test `encoder` caches of the class folders `names`; train class c has
    per_class[c] images, test 2 each."""
    for split, counts in (("train", per_class), ("test", (2,) * len(per_class))):
        for c, (name, n) in enumerate(zip(names, counts, strict=False)):
            write_images(root / split / name, n, seed=10 * c + len(split))
        encode("--encoder", encoder, "--data", str(root / split), "--out", str(root / f"{split}-cache"))
    return root / "train-cache", root / "test-cache"


def make_run(
    run_dir: Path,
    text_cache: Path,
    *,
    text_kind: str = "prior",
    use_tokens: bool = True,
    encoders: dict[str, object] | None = None,
) -> Path:
    """A run folder with random adapters (image linear 16->12, text `text_kind` 16->12).

    `encoders` ({"image_encoder": id, "text_encoder": id}) is written as the run's encoders.json, as
    training records its features' encoders; without it the run has no record (runs from before it).
    """
    from csaligner.adapters import AdapterConfig, build_adapter, save_adapter
    from csaligner.train.model import write_run_encoders

    run_dir.mkdir(parents=True)
    small = {"num_layers": 1, "num_heads": 2, "head_dim": 4} if text_kind == "prior" else {}
    sides = {"image": AdapterConfig("linear", 16, OUT_DIM), "text": AdapterConfig(text_kind, 16, OUT_DIM, **small)}
    for side, cfg in sides.items():
        save_adapter(build_adapter(cfg), cfg, run_dir / f"{side}_adapter.safetensors")
    config = {
        "data": {"text_cache": str(text_cache), "use_tokens": use_tokens},
        "model": {"image": {"kind": "linear"}, "text": {"kind": text_kind}},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if encoders:
        write_run_encoders(str(run_dir), encoders)
    return run_dir


def count_cache_json_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[Path]:
    """From now on, how often each cache folder's cache.json is read (`FeatureCache.open` reads it once)."""
    reads: Counter[Path] = Counter()
    read_text = Path.read_text

    def counting(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "cache.json":
            reads[self.parent.resolve()] += 1
        return read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", counting)
    return reads
