"""Kernel tests: the Triton kernels run in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when `csaligner.kernels.triton_kernels`
is first imported; this conftest runs before any kernel test module imports it. With CUDA the
variable is left alone so the same tests (and the @pytest.mark.gpu ones) run the compiled kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is faster than two, and much faster on a shared CPU."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
