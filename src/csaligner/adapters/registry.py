"""Adapter base class, the registry of adapter kinds by name, and `build_adapter`.

Adding a kind (timm / PEFT style)::

    @register_adapter("my_head")
    class MyHead(Adapter):
        settings = ("bias",)  # the AdapterConfig fields from_config reads besides kind, in_dim, out_dim

        @classmethod
        def from_config(cls, config: AdapterConfig) -> MyHead:
            return cls(config.in_dim, config.out_dim)

        def forward(self, x: Tensor, **kwargs: Any) -> Tensor:  # (B, D_in) -> (B, D_out)
            ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from csaligner.adapters.config import AdapterConfig


class Adapter(nn.Module):
    """Base of every adapter: a trainable map (B, D_in) -> (B, D_out) on frozen features.

    Calling convention: ``adapter(x, text_tokens=..., text_token_mask=...)``. Every adapter accepts
    and ignores keyword arguments it does not use (token states, masks), so a training loop can call
    the image-side and text-side adapters the same way whatever their kind.
    """

    in_dim: int
    out_dim: int
    settings: ClassVar[tuple[str, ...] | None] = None
    """The `AdapterConfig` fields `from_config` reads besides kind, in_dim and out_dim. A model.image /
    model.text setting outside them changes nothing, so a training config that gives one is refused;
    None (a kind that does not declare them) accepts every field."""

    @classmethod
    def unused_settings(cls, in_dim: int, out_dim: int) -> dict[str, str]:
        """The `settings` these widths leave unused (any value builds the same adapter), each with why; {} by
        default. An AdapterConfig or a training run that gives one of them is refused, as for a field outside
        `settings`.

        Args:
            in_dim: input width D_in.
            out_dim: output width D_out.
        """
        return {}

    @classmethod
    def from_config(cls, config: AdapterConfig) -> Adapter:
        """Build the adapter from the kind-specific fields of `config`."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config(config)")


A = TypeVar("A", bound=type[Adapter])

ADAPTERS: dict[str, type[Adapter]] = {}
"""Registered adapter classes by kind name; filled by `@register_adapter`."""


def register_adapter(name: str) -> Callable[[A], A]:
    """Class decorator that registers an `Adapter` subclass under `name` for `build_adapter`.

    Args:
        name: the kind string used in `AdapterConfig.kind` and YAML.

    Returns:
        The decorator; it returns the class unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(f"@register_adapter({name!r}) needs an Adapter subclass, got {cls!r}")
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise ValueError(
                f"adapter kind {name!r} is already registered to {ADAPTERS[name].__name__}; pick another name"
            )
        ADAPTERS[name] = cls
        return cls

    return decorator


def build_adapter(config: AdapterConfig) -> Adapter:
    """Build the adapter named by `config.kind`.

    Args:
        config: a validated `AdapterConfig`.

    Returns:
        A freshly initialised adapter (float32, on the default device) mapping (B, in_dim) -> (B, out_dim).
    """
    cls = ADAPTERS.get(config.kind)
    if cls is None:
        raise ValueError(f"unknown adapter kind {config.kind!r}; choose one of {sorted(ADAPTERS)}")
    return cls.from_config(config)


def reads_text_tokens(adapter: type[nn.Module] | nn.Module) -> bool:
    """True when an adapter (class or instance) reads text token states: its forward names a `text_tokens`
    parameter (the prior). The pooled-only kinds (mlp, linear, identity) take them in `**kwargs` and ignore them.
    """
    return "text_tokens" in inspect.signature(adapter.forward).parameters


def check_adapter_input(name: str, x: Tensor, dim: int) -> None:
    """Cheap shape/dtype check on an adapter input (no device sync, so it is safe in a hot loop).

    Args:
        name: argument name used in the error message.
        x: the input, expected (B, dim) floating.
        dim: expected feature width.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(x.shape)}; check the adapter's in_dim")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}; cast it with .float()")
