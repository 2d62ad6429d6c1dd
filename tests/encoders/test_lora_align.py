"""experiments/lora_align.py end to end on a tiny random BERT: LoRA trains, the base stays, metrics are written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from csaligner.data.features import PairedFeatures
from csaligner.encoders import LoraTextEncoder
from tests.encoders.conftest import VOCAB, save_tokenizer

pytest.importorskip("peft")
lora_align = pytest.importorskip("experiments.lora_align")

WORDS = VOCAB[5:]


def tiny_features(num_images: int, gen: torch.Generator) -> PairedFeatures:
    """num_images random 16-d images with 2 captions each, made of the tiny vocabulary's words."""
    t2i = torch.arange(num_images).repeat_interleave(2)
    captions = [" ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(4)) for i in range(len(t2i))]
    return PairedFeatures(
        image=torch.randn(num_images, 16, generator=gen),
        text=torch.randn(len(t2i), 32, generator=gen),
        text_to_image=t2i,
        image_ids=[f"img{i}.jpg" for i in range(num_images)],
        captions=captions,
    )


def test_lora_run_trains_only_lora_and_writes_retrieval(tiny_bert: nn.Module, tmp_path: Path) -> None:
    from transformers import BertTokenizer

    save_tokenizer(tmp_path / "tok")
    encoder = LoraTextEncoder(tiny_bert, BertTokenizer.from_pretrained(str(tmp_path / "tok")), max_length=16)
    lora = {n: p.detach().clone() for n, p in encoder.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    train, dev = tiny_features(8, gen), tiny_features(6, gen)
    settings = lora_align.RunSettings(lam=1.0, steps=3, batch_size=4, lora_lr=1e-2, dim=8)

    result = lora_align.train_and_evaluate(train, dev, encoder, settings, tmp_path / "run", progress=False)

    # 3 steps: the first moves every B off zero, the later ones move every A too
    assert all(not torch.equal(lora[n], p) for n, p in encoder.named_parameters() if p.requires_grad)
    assert all(torch.equal(base[n], p) for n, p in encoder.named_parameters() if not p.requires_grad)
    assert encoder.training  # evaluation merged, unmerged and restored the mode
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    metrics = saved["metrics"]
    recalls = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert set(recalls) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in recalls)
    assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in recalls))
    assert metrics["i2t_R@10"] == 100.0  # 6 dev images, 12 captions: the top 10 always holds one of the 2
    assert saved["text_encoder"] == "lora" and saved["trainable_lora"] > 0
    assert {"centroid_distance", "linear_separability"} <= set(metrics)


def test_frozen_run_uses_cached_text_and_no_encoder(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    train, dev = tiny_features(8, gen), tiny_features(6, gen)
    settings = lora_align.RunSettings(lam=0.0, steps=2, batch_size=4, dim=8)
    result = lora_align.train_and_evaluate(train, dev, None, settings, tmp_path / "run", progress=False)
    assert result["text_encoder"] == "frozen" and result["trainable_lora"] == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["rsum"] > 0


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    s = lora_align.RunSettings(steps=100, warmup_fraction=0.05)
    factors = [lora_align.lr_factor(i, s) for i in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:])) and factors[-1] < 0.01
