"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so random inputs and inits are reproducible."""
    torch.manual_seed(0)
