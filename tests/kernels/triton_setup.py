"""Shared setup of the Triton kernel test modules: skip without a Triton runtime, the device, small tiles.

Importing this module skips the importing test module when triton is missing, or when there is
neither CUDA nor TRITON_INTERPRET=1 (set by this folder's conftest on machines without CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from csaligner.kernels.triton_strips import TritonStrips  # noqa: E402

SMALL = TritonStrips(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
"""16-wide tiles: partial tiles, several strips and grouped ordering at a few dozen rows."""
