"""hf-text, sentence-transformers and hf-clip loaders on tiny random models saved to disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from csaligner.encoders import get_encoder, mean_pool

TEXTS = ["a dog runs on the grass", "a red ball", "child plays"]


def test_hf_text_masked_mean_pooling(tiny_bert_dir: Path, tiny_bert: torch.nn.Module) -> None:
    enc = get_encoder(f"hf-text:{tiny_bert_dir}")
    assert enc.modality == "text" and enc.embed_dim == 32 and enc.id.startswith("hf-text@")
    out = enc.encode_texts(TEXTS, tokens=True)
    assert out.tokens is not None and out.mask is not None
    # Each caption alone (no padding) gives the same pooled vector as inside the padded batch.
    for j, t in enumerate(TEXTS):
        torch.testing.assert_close(enc.encode_texts([t]).pooled[0], out.pooled[j], atol=1e-5, rtol=1e-5)
    tok = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tiny_bert(**tok).last_hidden_state
    torch.testing.assert_close(out.pooled, mean_pool(hidden, tok["attention_mask"].bool()), atol=1e-5, rtol=1e-5)


def test_weight_hash_is_in_the_id(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import BertModel

    from .conftest import save_tokenizer, tiny_bert_config

    other = tmp_path / "other"
    BertModel(tiny_bert_config()).save_pretrained(str(other))  # different random weights
    save_tokenizer(other)
    assert get_encoder(f"hf-text:{tiny_bert_dir}").id != get_encoder(f"hf-text:{other}").id
    assert get_encoder(f"hf-text:{tiny_bert_dir}").id == get_encoder(f"hf-text:{tiny_bert_dir}").id


def write_sentence_transformers_folder(bert_dir: Path, out: Path) -> Path:
    """The on-disk layout of a sentence-transformers model (as in all-MiniLM-L6-v2): transformer + mean pooling."""
    shutil.copytree(bert_dir, out)
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    return out


def test_sentence_transformers_folder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    folder = write_sentence_transformers_folder(tiny_bert_dir, tmp_path / "st")
    enc = get_encoder(f"sentence-transformers:{folder}")
    assert enc.embed_dim == 32 and enc.token_dim == 32 and enc.text_max_length == 64
    out = enc.encode_texts(TEXTS, tokens=True)
    assert out.pooled.shape == (3, 32) and out.mask is not None and out.tokens is not None
    direct = get_encoder(f"hf-text:{tiny_bert_dir}").encode_texts(TEXTS).pooled
    torch.testing.assert_close(out.pooled, direct, atol=1e-5, rtol=1e-5)


def test_hf_clip_both_towers(tiny_clip_dir: Path) -> None:
    enc = get_encoder(f"hf-clip:{tiny_clip_dir}")
    assert enc.modality == "both" and enc.embed_dim == 12 and enc.text_max_length == 16
    pre = enc.image_preprocess
    assert pre is not None and pre.size == 32
    imgs = [Image.new("RGB", (48, 32), (i * 80, 40, 200)) for i in range(3)]
    img = enc.encode_images(imgs, tokens=True)
    assert img.pooled.shape == (3, 12) and img.tokens is not None and img.tokens.shape == (3, 17, 24)
    txt = enc.encode_texts(TEXTS, tokens=True)
    assert txt.pooled.shape == (3, 12) and txt.tokens is not None and txt.tokens.shape[2] == 32
    assert torch.isfinite(img.pooled).all() and torch.isfinite(txt.pooled).all()
