"""Shared fixtures: every test starts from the same seed."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

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


@pytest.fixture
def known_umask() -> Iterator[int]:
    """Run the test under umask 0o027 (files 0o640, folders 0o750), neither owner-only 0600 nor the usual
    0o022, so a test can tell the umask-derived mode from both; the previous umask is restored."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)
