"""Shared fixtures: every test starts from the same seed."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The flag must be set before
# anything (diffusers, torch._dynamo, the kernels) imports triton, so it lives in the root conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
