from __future__ import annotations

import pytest
import torch
import train_standins

# Tiny tensors on 2 shared cores: one intra-op thread avoids spin-wait contention (4x faster here).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    train_standins.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))


@pytest.fixture
def features():
    return train_standins.synthetic_features()


@pytest.fixture
def token_features():
    return train_standins.synthetic_features(tokens=True)
