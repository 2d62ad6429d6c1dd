from __future__ import annotations

import pytest
import torch

from tests.train.helpers import synthetic_features

# Tiny tensors on 2 shared cores: one intra-op thread avoids spin-wait contention (4x faster here).
torch.set_num_threads(1)


@pytest.fixture
def features():
    return synthetic_features()


@pytest.fixture
def token_features():
    return synthetic_features(tokens=True)
