"""Trainable adapters on frozen features: prior transformer, MLP, linear, identity; a registry; I/O.

Example:
    >>> from csaligner.adapters import AdapterConfig, build_adapter, save_adapter, load_adapter
    >>> cfg = AdapterConfig(kind="prior", in_dim=768, out_dim=768)
    >>> prior = build_adapter(cfg)
    >>> image_like = prior(text, text_tokens=tokens, text_token_mask=mask)   # (B, 768)
    >>> save_adapter(prior, cfg, "prior.safetensors")
    >>> prior, cfg = load_adapter("prior.safetensors")
"""

from csaligner.adapters.config import AdapterConfig, check_settings_apply, kind_settings
from csaligner.adapters.prior import PriorTransformerAdapter
from csaligner.adapters.registry import ADAPTERS, Adapter, build_adapter, reads_text_tokens, register_adapter
from csaligner.adapters.serialization import load_adapter, read_adapter_config, save_adapter
from csaligner.adapters.simple import IdentityAdapter, LinearAdapter, MLPAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfig",
    "IdentityAdapter",
    "LinearAdapter",
    "MLPAdapter",
    "PriorTransformerAdapter",
    "build_adapter",
    "check_settings_apply",
    "kind_settings",
    "load_adapter",
    "read_adapter_config",
    "reads_text_tokens",
    "register_adapter",
    "save_adapter",
]
