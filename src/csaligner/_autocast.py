"""Keep the loss functions' own precision under an ambient `torch.autocast`.

Training loops commonly run the forward pass, loss included, under autocast. The losses already pick
their precision (float32 statistics for bf16/fp16/fp32 features, float64 for float64), and the
chunked and Triton paths ignore autocast; under it, the dense references' matmuls would run in
bfloat16/float16 instead, so ||a||^2 + ||b||^2 - 2 a.b loses everything below ~1e-2 and D_CS at
sigma 0.05 came out 0.36 instead of 0.92: the dense and chunked paths disagreed, and
`impl="auto"` switched between them with the batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")


def autocast_off(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with autocast disabled on the device of its first tensor argument (when it is enabled)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
