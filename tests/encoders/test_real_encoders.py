"""The built-in encoders on real shared data (slow: ~1 minute on 2 cores; runs in CI).

EfficientNet-Lite0 and MiniLM live in unrelated spaces, so matching is not checked in raw
space; instead: MiniLM puts an image's 5 captions closer to each other than to other images'
captions, a ridge map text -> image fitted on 40 images ranks held-out matches far above chance,
image features are finite, deterministic and distinct, and the ImageNet head on our pooled
features recognises daisies (which checks the preprocessing/normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from csaligner.data import (
    EncodeConfig,
    ImageTextManifest,
    PairedFeatures,
    encode_manifest,
    load_paired_features,
    resolve_dataset,
)
from csaligner.data.cache import cache_key
from csaligner.encoders import FrozenEncoder, get_encoder

pytestmark = pytest.mark.slow


def _dataset(spec: str) -> ImageTextManifest:
    try:
        return resolve_dataset(spec)
    except FileNotFoundError as err:
        pytest.skip(f"shared data not available: {err}")


def _encoder(name: str) -> FrozenEncoder:
    try:
        return get_encoder(name)
    except ValueError as err:  # EncoderUnavailableError: package not installed
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def effnet() -> FrozenEncoder:
    return _encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def flickr50(effnet: FrozenEncoder, tmp_path_factory: pytest.TempPathFactory) -> PairedFeatures:
    m = _dataset("flickr8k:dev:50")
    out = tmp_path_factory.mktemp("real")
    cfg = EncodeConfig(dtype="fp32", batch_size=25, progress=False, tokens=True)
    encode_manifest(effnet, m, out / "img", cfg)
    encode_manifest(_encoder("minilm"), m, out / "txt", cfg)
    return load_paired_features(out / "img", out / "txt")


def test_shapes_and_contract(flickr50: PairedFeatures) -> None:
    f = flickr50
    assert f.image.shape == (50, 1280) and f.text.shape == (250, 384)
    assert f.image_tokens is not None and f.image_tokens.shape == (50, 49, 1280)
    assert f.text_tokens is not None and f.text_token_mask is not None
    assert f.text_token_mask.sum(1).min() >= 3  # [CLS] word(s) [SEP]
    torch.testing.assert_close(f.image_tokens.mean(1), f.image, atol=1e-4, rtol=1e-4)  # pooled = mean of 7x7 cells
    torch.testing.assert_close(f.text.norm(dim=-1), torch.ones(250), atol=1e-3, rtol=0)  # MiniLM is L2-normalised


def test_image_features_finite_deterministic_distinct(flickr50: PairedFeatures, effnet: FrozenEncoder) -> None:
    from PIL import Image

    m = resolve_dataset("flickr8k:dev:4")
    direct = effnet.encode_images([Image.open(p) for p in m.image_paths]).pooled
    torch.testing.assert_close(direct, flickr50.image[:4], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(flickr50.image).all()
    cos = F.normalize(flickr50.image, dim=-1) @ F.normalize(flickr50.image, dim=-1).T
    assert float((cos - 2 * torch.eye(50)).max()) < 0.95  # no two images collapse to one vector


def test_minilm_groups_captions_of_the_same_image(flickr50: PairedFeatures) -> None:
    t = F.normalize(flickr50.text, dim=-1)
    g = flickr50.text_to_image
    sim = t @ t.T
    same = (g[:, None] == g[None, :]) & ~torch.eye(len(g), dtype=torch.bool)
    cross = g[:, None] != g[None, :]
    # Measured 0.58 vs 0.08 on flickr8k:dev:50.
    assert float(sim[same].mean()) > float(sim[cross].mean()) + 0.2


def test_ridge_map_text_to_image_ranks_held_out_matches(flickr50: PairedFeatures) -> None:
    x, y, g = flickr50.text, flickr50.image, flickr50.text_to_image
    train = g < 40
    mx, my = x[train].mean(0), y[g[train]].mean(0)
    xc, yc = x[train] - mx, y[g[train]] - my
    w = torch.linalg.solve(xc.T @ xc + torch.eye(x.shape[1]), xc.T @ yc)  # closed-form ridge, lambda = 1
    pred = F.normalize((x[~train] - mx) @ w, dim=-1)
    sim = pred @ F.normalize(y[40:] - my, dim=-1).T  # 50 held-out captions vs their 10 images
    truth = (g[~train] - 40)[:, None]
    ranks = (sim > sim.gather(1, truth)).sum(1).float()
    # Chance: mean rank 4.5 of 0..9, R@1 0.1. Measured: mean rank 0.9, R@1 0.42.
    assert float(ranks.mean()) < 2.5 and float((ranks == 0).float().mean()) > 0.25


def test_imagenet_head_recognises_daisies(effnet: FrozenEncoder) -> None:
    from PIL import Image

    m = _dataset("flowers:train")
    daisies = [p for p, c in zip(m.image_paths, m.labels, strict=True) if m.class_names[c] == "daisy"][:16]
    pooled = effnet.encode_images([Image.open(p) for p in daisies]).pooled
    with torch.inference_mode():
        logits = effnet.model._fc(pooled)  # type: ignore[attr-defined]
    # ImageNet class 985 is "daisy". With the TF-Lite normalisation ~80% are top-1 on this set.
    assert float((logits.argmax(-1) == 985).float().mean()) >= 0.6


def test_a_demo_rerun_checks_finished_cache_keys_without_loading_an_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rerun of `csalign demo` loaded both encoders (about half its ~12 s) only to compare each cache's key."""
    import csaligner.encoders as encoders
    from csaligner.flickr_demo import FlickrDemoSettings, encode_caches

    _dataset("flickr8k:dev:2")
    _encoder("minilm")
    settings = FlickrDemoSettings(train_images=2, dev_images=2, cache_dir=tmp_path / "cache")
    first = encode_caches(settings)  # loads both encoders and encodes 4 tiny caches
    capsys.readouterr()

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cache's key is known without loading its encoder")

    monkeypatch.setattr(encoders, "get_encoder", no_loading)
    assert encode_caches(settings) == first
    assert capsys.readouterr().out.count("key checked without loading") == 4
    # A cache from other settings is not reused unseen: encode loads the encoder and says what differs.
    cache_json = first["dev_text"] / "cache.json"
    state = json.loads(cache_json.read_text())
    state["key_fields"]["dtype"] = "fp16"
    state["key"] = cache_key(state["key_fields"])
    cache_json.write_text(json.dumps(state))
    with pytest.raises(AssertionError, match="without loading"):
        encode_caches(settings)
