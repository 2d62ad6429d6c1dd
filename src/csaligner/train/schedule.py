"""Learning-rate schedule (linear warmup, cosine decay) and an EMA of the weights.

The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from csaligner.train.config import TrainConfig


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """train.warmup_steps, or warmup_fraction of the total, capped at the total."""
    steps = config.warmup_steps or round(config.warmup_fraction * total_steps)
    return min(steps, total_steps)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup then cosine (or constant)."""
    warm = warmup_steps(config, total_steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    progress = (step - warm) / max(1, total_steps - warm)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


class WeightEMA:
    """Exponential moving average of a module's floating-point state (parameters and buffers).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so a short run's
    average is not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        self.updates += 1

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into `module` (cast to its dtypes)."""
        state = module.state_dict()
        module.load_state_dict({k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in state.items()})
