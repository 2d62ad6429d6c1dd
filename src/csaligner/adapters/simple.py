"""Small adapters on pooled features: identity, linear, and the CLIP-Adapter residual bottleneck MLP.

All take (B, D_in) features and return (B, D_out); keyword arguments such as `text_tokens` are
accepted and ignored so a training loop can call every adapter the same way.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from csaligner.adapters.config import AdapterConfig
from csaligner.adapters.registry import Adapter, check_adapter_input, register_adapter


@register_adapter("identity")
class IdentityAdapter(Adapter):
    """No parameters: returns its input. Use it for the frozen side of an alignment.

    Args:
        dim: feature width (in_dim == out_dim).
    """

    settings = ()

    def __init__(self, dim: int) -> None:
        super().__init__()
        AdapterConfig("identity", dim, dim)  # validates the width
        self.in_dim = self.out_dim = dim

    @classmethod
    def from_config(cls, config: AdapterConfig) -> IdentityAdapter:
        """Build from `config` (needs in_dim == out_dim; checked by AdapterConfig)."""
        return cls(config.in_dim)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Return `x` (B, D) unchanged; token kwargs are ignored."""
        check_adapter_input("x", x, self.in_dim)
        return x


@register_adapter("linear")
class LinearAdapter(Adapter):
    """One linear layer (B, D_in) -> (B, D_out), optionally with bias.

    Initialisation: PyTorch's default `nn.Linear` init (Kaiming-uniform weights).

    Args:
        in_dim: input width D_in.
        out_dim: output width D_out.
        bias: learn an additive bias.
    """

    settings = ("bias",)

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        AdapterConfig("linear", in_dim, out_dim, bias=bias)  # validates the widths
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> LinearAdapter:
        """Build from `config.in_dim`, `config.out_dim` and `config.bias`."""
        return cls(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Map (B, D_in) -> (B, D_out); the input is cast to the weight dtype, token kwargs are ignored."""
        check_adapter_input("x", x, self.in_dim)
        return self.linear(x.to(self.linear.weight.dtype))


@register_adapter("mlp")
class MLPAdapter(Adapter):
    """CLIP-Adapter residual bottleneck: y = alpha * MLP(x) + (1 - alpha) * proj(x).

    MLP is Linear(D_in, D_in // ratio, no bias) -> ReLU -> Linear(hidden, D_out, no bias), as in
    CLIP-Adapter but without its trailing ReLU, which would confine the residual branch to the
    positive orthant of a feature space whose coordinates have both signs. `proj` is the identity
    when D_in == D_out (no parameters) and a Linear otherwise. Initialisation: PyTorch's default
    `nn.Linear` init, so at step 0 the output is (1 - alpha) * proj(x) plus a small random residual.

    Args:
        in_dim: input width D_in.
        out_dim: output width D_out.
        ratio: bottleneck ratio; hidden width = in_dim // ratio.
        alpha: residual ratio in [0, 1]; the weight of the MLP branch.
        bias: bias of the side projection; with in_dim == out_dim there is none (the projection is the
            identity), so bias=False is refused there (`unused_settings`).
    """

    settings = ("mlp_ratio", "mlp_alpha", "bias")

    @classmethod
    def unused_settings(cls, in_dim: int, out_dim: int) -> dict[str, str]:
        """bias when in_dim == out_dim: its only place is the side projection, which is then the identity."""
        if in_dim != out_dim:
            return {}
        return {
            "bias": "its only place, the side projection, is the identity when the widths are equal (and the MLP "
            "branch has no bias), so the adapter has no bias either way"
        }

    def __init__(self, in_dim: int, out_dim: int, ratio: int = 4, alpha: float = 0.2, bias: bool = True) -> None:
        super().__init__()
        AdapterConfig("mlp", in_dim, out_dim, mlp_ratio=ratio, mlp_alpha=alpha, bias=bias)  # validates
        hidden = in_dim // ratio
        self.in_dim, self.out_dim, self.alpha = in_dim, out_dim, float(alpha)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False),
        )
        self.proj: nn.Module = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=bias)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> MLPAdapter:
        """Build from `config.mlp_ratio`, `config.mlp_alpha` and `config.bias`."""
        return cls(config.in_dim, config.out_dim, ratio=config.mlp_ratio, alpha=config.mlp_alpha, bias=config.bias)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Map (B, D_in) -> (B, D_out); the input is cast to the weight dtype, token kwargs are ignored."""
        check_adapter_input("x", x, self.in_dim)
        x = x.to(cast(nn.Linear, self.mlp[0]).weight.dtype)
        return self.alpha * self.mlp(x) + (1.0 - self.alpha) * self.proj(x)
