"""Encoder names -> factories. `get_encoder("minilm")`, `get_encoder("hf-clip:/models/clip-b32")`.

A name is either plain ("efficientnet-lite0") or a loader prefix with an argument after the first
colon ("hf-text:<dir>"). Choice is by exact registered name, never by substring.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from csaligner.encoders.base import FrozenEncoder

Factory = Callable[..., FrozenEncoder]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    takes_arg: bool
    usage: str
    help: str


_REGISTRY: dict[str, _Entry] = {}
# Modules whose import registers the built-in encoders; imported on first lookup so that
# `import csaligner.encoders` does not import transformers.
_BUILTIN_MODULES = (
    "csaligner.encoders.tiny",
    "csaligner.encoders.efficientnet",
    "csaligner.encoders.text",
    "csaligner.encoders.clip",
    "csaligner.encoders.gemma",
)
_loaded = False


def register_encoder(
    name: str, *, takes_arg: bool = False, usage: str | None = None, help: str = ""
) -> Callable[[Factory], Factory]:
    """Decorator registering `factory(arg, *, device)` (with an argument) or `factory(*, device)` under `name`.

    Args:
        name: the registry name; must not contain ':'.
        takes_arg: the name is a prefix and everything after the first ':' is passed to the factory.
        usage: how to spell it, shown in error messages (default `name` or `name:<arg>`).
        help: one line shown by `list_encoders`.
    """
    if ":" in name or not name:
        raise ValueError(f"encoder name must be non-empty and contain no ':', got {name!r}")

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"encoder {name!r} is already registered; unregister_encoder({name!r}) first")
        _REGISTRY[name] = _Entry(factory, takes_arg, usage or (f"{name}:<arg>" if takes_arg else name), help)
        return factory

    return deco


def unregister_encoder(name: str) -> None:
    """Remove a registered name (tests register throwaway encoders)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def list_encoders() -> dict[str, str]:
    """Usage string -> one-line help, for every registered encoder."""
    _load_builtins()
    return {e.usage: e.help for e in sorted(_REGISTRY.values(), key=lambda e: e.usage)}


def get_encoder(name: str, *, device: str = "cpu") -> FrozenEncoder:
    """Build a registered encoder from its name; it never reaches the network.

    Args:
        name: "efficientnet-lite0", "minilm", "gemma3-270m", "hf-clip:<dir>", "hf-text:<dir>",
            "sentence-transformers:<dir>", "open_clip:<arch>:<checkpoint>", "tiny-image", "tiny-text",
            or any name added with `register_encoder`.
        device: torch device the model is moved to.

    Raises:
        ValueError: unknown name (the message lists the known ones), a missing argument, or a
            missing package / path (`EncoderUnavailableError`, which says what to install or pass).
    """
    _load_builtins()
    prefix, sep, arg = name.partition(":")
    entry = _REGISTRY.get(prefix)
    if entry is None:
        known = "\n  ".join(f"{u:36s} {h}" for u, h in list_encoders().items())
        raise ValueError(f"unknown encoder {name!r}. Known encoders:\n  {known}")
    if entry.takes_arg:
        if not sep or not arg:
            raise ValueError(f"encoder {prefix!r} needs an argument: use {entry.usage!r}")
        encoder = entry.factory(arg, device=device)
    elif sep:
        raise ValueError(f"encoder {prefix!r} takes no argument after ':', got {name!r}; use {entry.usage!r}")
    else:
        encoder = entry.factory(device=device)
    # Caches and runs record how to load it again (see `encoder_spec`); a class with __slots__ records none.
    with contextlib.suppress(AttributeError):
        setattr(encoder, SPEC_ATTRIBUTE, portable_spec(name))
    return encoder


SPEC_ATTRIBUTE = "registry_spec"


def portable_spec(name: str) -> str:
    """`name` with every local path in its argument made absolute: it loads again from any folder.

    "hf-text:./weights" -> "hf-text:/home/me/proj/weights"; "open_clip:ViT-B-32:ckpt.pt" keeps the arch.
    """
    from pathlib import Path

    prefix, sep, arg = name.partition(":")
    parts = [str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p for p in arg.split(":")]
    return f"{prefix}{sep}{':'.join(parts)}"


def encoder_spec(encoder: FrozenEncoder) -> str | None:
    """The `get_encoder` name that built `encoder` (paths absolute), or None for one built another way.

    An encoder id ("hf-text@<weights hash>") says which weights, not where they are; this says how to
    load them, so prompts for a run can be encoded by the encoder it was trained on."""
    spec = getattr(encoder, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, str) else None
