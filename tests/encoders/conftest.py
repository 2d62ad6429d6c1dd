"""Tiny randomly initialised Hugging Face models saved to tmp folders: no downloads, seconds to build."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "child", "plays", "water"],
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def save_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))


def tiny_bert_config() -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )


@pytest.fixture
def tiny_bert() -> torch.nn.Module:
    from transformers import BertModel

    return BertModel(tiny_bert_config()).eval()


@pytest.fixture
def tiny_bert_dir(tmp_path: Path, tiny_bert: torch.nn.Module) -> Path:
    folder = tmp_path / "bert"
    tiny_bert.save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder


@pytest.fixture
def tiny_clip_dir(tmp_path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(VOCAB),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    folder = tmp_path / "clip"
    CLIPModel(cfg).eval().save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder
