"""Save and load adapters as safetensors: weights as tensors, the `AdapterConfig` as JSON metadata.

No pickle anywhere: a file holds only named tensors and strings, so loading one cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from csaligner._safetensors_io import save_safetensors
from csaligner.adapters.config import AdapterConfig, drop_ignored_fields
from csaligner.adapters.registry import ADAPTERS, Adapter, build_adapter

FORMAT = "csaligner.adapter"
FORMAT_VERSION = "1"


def save_adapter(module: nn.Module, config: AdapterConfig, path: str | os.PathLike[str]) -> Path:
    """Write `module`'s weights and `config` to one safetensors file (atomically).

    Args:
        module: the adapter, as built by `build_adapter(config)` and trained.
        config: the config it was built from; stored as JSON in the file's metadata.
        path: destination file (".safetensors" by convention); parent folders are created.

    Returns:
        The path written.

    Raises:
        ValueError: if the module does not match what `config` builds: its class (a subclass must be
            registered with `@register_adapter` and saved under its own kind, as `load_adapter` builds
            by kind), weight names or shapes, or settings the weights do not show (mlp_alpha, num_heads
            vs head_dim, causal, dropout).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    state = module.state_dict()
    with torch.device("meta"):  # shapes only: no memory, no init cost even for the 10-layer prior
        reference = build_adapter(config)
    what = f"module does not match config (kind={config.kind!r})"
    _check_class(module, reference, config, what)
    _check_state(state, reference.state_dict(), what)
    _check_settings(module, reference, what)
    # clone: safetensors refuses tensors that share storage, and a saved file must not alias live weights
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    # sorted keys here and a canonical header (save_safetensors): saving the same adapter twice gives the same bytes
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_json}
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_safetensors(tensors, tmp, metadata=metadata)
    os.replace(tmp, dest)  # a crash mid-write never leaves a truncated adapter behind
    return dest


def read_adapter_config(path: str | os.PathLike[str]) -> AdapterConfig:
    """Read only the `AdapterConfig` stored in an adapter file (no weights loaded).

    Args:
        path: a file written by `save_adapter`.

    Returns:
        The stored config.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"adapter file {str(src)!r} does not exist; check the path (save with save_adapter)")
    try:
        with safe_open(str(src), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{str(src)!r} is not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(
            f"{str(src)!r} is not a csaligner adapter file (metadata format={metadata.get('format')!r}); "
            "write adapters with csaligner.adapters.save_adapter"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(src)!r} has adapter format version {metadata.get('format_version')!r}; "
            f"this csaligner reads version {FORMAT_VERSION}"
        )
    try:
        data = json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(src)!r} has a corrupt config in its metadata ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{str(src)!r} stores a config of type {type(data).__name__}, expected a JSON object")
    # A file from before the settings checks may hold a value its kind ignored: it loads, as the same adapter.
    return AdapterConfig.from_dict(drop_ignored_fields(data))


def load_adapter(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expected_config: AdapterConfig | None = None,
) -> tuple[Adapter, AdapterConfig]:
    """Rebuild an adapter from a file written by `save_adapter`.

    Args:
        path: the safetensors file.
        device: where to put the weights.
        expected_config: if given, the stored config must equal it (e.g. the config of the run
            that is about to use the adapter); a difference raises ValueError naming the fields.

    Returns:
        (adapter, config): the adapter with the saved weights and dtype, in training mode (call
        `.eval()` for inference), and the config read from the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not an adapter file, corrupt metadata, a config that differs from
            `expected_config`, or weights whose names or shapes do not match the stored config.
    """
    config = read_adapter_config(path)
    if expected_config is not None and config != expected_config:
        stored, wanted = config.to_dict(), expected_config.to_dict()
        diff = {k: (stored[k], wanted[k]) for k in stored if stored[k] != wanted[k]}
        raise ValueError(
            f"adapter config in {str(path)!r} differs from the expected config: "
            + ", ".join(f"{k}: file {a!r} vs expected {b!r}" for k, (a, b) in diff.items())
        )
    tensors = load_file(str(path), device=str(device))
    module = build_adapter(config)
    _check_state(
        tensors, module.state_dict(), f"weights in {str(path)!r} do not match its config (kind={config.kind!r})"
    )
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:  # keep a bf16 / fp16 adapter in its saved precision
        module.to(dtype=float_dtypes.pop())
    module.load_state_dict(tensors, strict=True)
    return module.to(device), config


def _check_class(module: nn.Module, reference: nn.Module, config: AdapterConfig, what: str) -> None:
    """Refuse a module of another class than `config.kind` builds: `load_adapter` rebuilds that class.

    Saved as its base's kind, a subclass would load as the base, without what it changes (a forward,
    an init); registered under a kind of its own, it saves and loads as itself.
    """
    got, want = type(module), type(reference)
    if got is want:
        return
    name, rebuilt = got.__name__, f"load_adapter rebuilds kind {config.kind!r} as {want.__name__}"
    kinds = sorted(kind for kind, cls in ADAPTERS.items() if cls is got)
    if kinds:
        fix = f"{name} is registered as kind {kinds[0]!r}: save it with dataclasses.replace(config, kind={kinds[0]!r})"
    elif issubclass(got, want):
        fix = (
            f"{name} subclasses {want.__name__} but is not registered, so it would load without what it changes; "
            f"register it under a kind of its own (@register_adapter('my_kind') on class {name}) and save it with "
            "dataclasses.replace(config, kind='my_kind')"
        )
    else:
        fix = f"pass the config it was built from, or register {name} with @register_adapter and save it with its kind"
    raise ValueError(f"{what}: module is a {name}, but {rebuilt}; {fix}")


def _check_state(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    """Raise ValueError listing missing / unexpected names and shape differences between state dicts."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = [
        f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
        for k in sorted(set(got) & set(want))
        if got[k].shape != want[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape (have vs config) {shapes[:5]}" if shapes else "",
        ]
        raise ValueError(f"{what}: " + "; ".join(p for p in parts if p) + "; save and load with the same config")


def _settings(module: nn.Module) -> dict[str, object]:
    """Scalar attributes of every submodule (alpha, causal, num_heads, dropout p, ...): what the
    forward pass depends on but the state dict does not hold, so a load takes them from the config."""
    out: dict[str, object] = {}
    for prefix, sub in module.named_modules():
        out[f"{prefix or '(root)'} type"] = type(sub).__name__
        for k, v in vars(sub).items():
            if not k.startswith("_") and k != "training" and isinstance(v, bool | int | float | str):
                out[f"{prefix}.{k}" if prefix else k] = v
    return out


def _check_settings(module: nn.Module, reference: nn.Module, what: str) -> None:
    """Raise ValueError listing the settings in which `module` differs from `reference` (built from the config)."""
    got, want = _settings(module), _settings(reference)
    # Only settings both hold: an attribute a module sets for itself later (a call counter, a cache flag)
    # is not a setting the config builds, and must not stop a save.
    diff = [f"{k}: {got[k]!r} vs {want[k]!r}" for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
    if diff:
        raise ValueError(
            f"{what}: settings (module vs config) {diff[:5]}; loading would rebuild it with the config's settings. "
            "Pass the config the module was built from (build_adapter(config) builds a matching one)"
        )
