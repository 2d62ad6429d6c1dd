"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of `<run>/checkpoints/step-000010/`:
    model.safetensors       adapter (and learnable-temperature) weights; EMA copies under "ema."
    optimizer.safetensors   optimiser state tensors flattened to "state.<param index>.<name>"
    state.json              step, epoch, RNG states (base64), optimiser hyper-parameters, scaler, config
`<run>/checkpoints/latest` names the newest complete checkpoint.

A checkpoint is written into a temporary directory and renamed into place (os.replace), and every
file is written to a temporary name first, so a crash never leaves a partial checkpoint behind.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from csaligner._safetensors_io import safetensors_bytes
from csaligner.train.stored_config import flatten, why_dropped

LATEST = "latest"
FORMAT_VERSION = 1

# Config fields a resumed run may change: where it runs, what it reports and where it writes, not what it
# computes. Everything else must match the stored config, epochs / steps included (the total number of steps
# shapes the warmup and cosine decay, so a longer run is another schedule, not a continuation). The cache
# paths may move; other data behind them is refused by its manifest hash (`resume._check_same_data`), and shows up as
# another step count or weight shape where the checkpoint predates that record.
RESUME_MAY_CHANGE = frozenset(
    {
        "data.image_cache",
        "data.text_cache",
        "loss.impl",  # the same math by another kernel path (dense, chunked, Triton)
        "train.device",
        "train.out_dir",
        "train.resume",
        "train.overwrite",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.progress",
        "train.tensorboard",
    }
)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and os.replace; nothing is left behind on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # canonical header: with metadata, plain safetensors.save orders its keys differently on every call
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors ("state.<i>.<name>") and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), Python and NumPy RNG states, JSON-able."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    version, internal, gauss = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[v.item() if hasattr(v, "item") else v for v in np_state[2:]]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def config_changes(
    stored: Mapping[str, Any],
    new: Mapping[str, Any],
    may_change: frozenset[str] = RESUME_MAY_CHANGE,
    as_stored: Mapping[str, Any] | None = None,
) -> list[str]:
    """ "section.field: old -> new" for every field outside `may_change` that differs.

    Args:
        stored: the config a checkpoint was written with (the `to_dict` form in state.json).
        new: the resuming run's config in the same form.
        may_change: dotted fields left out of the comparison.
        as_stored: the config as it was written, when `stored` is it with the settings its objective or
            adapter kinds ignored dropped (`drop_ignored_settings`). A changed field whose value was dropped
            then shows the value written and why it was dropped, not the default it became.
    """
    old, cur = flatten(stored), flatten(new)
    written = old if as_stored is None else flatten(as_stored)
    changed = []
    for key in sorted(old.keys() | cur.keys()):
        if key in may_change:
            continue
        if key not in old or key not in cur or old[key] != cur[key]:
            a, b = (repr(side[key]) if key in side else "(unset)" for side in (old, cur))
            if as_stored is not None and key in written and (key not in old or written[key] != old[key]):
                to = f" to {old[key]!r}" if key in old else ""
                a = f"{written[key]!r} (stored, but {why_dropped(key, as_stored)}: dropped{to})"
            changed.append(f"{key}: {a} -> {b}")
    return changed


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: tensors by file, and the JSON training state."""

    path: str
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(
    root: str | Path,
    step: int,
    model_tensors: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> str:
    """Write checkpoint `root/step-<step>/` atomically, point `root/latest` at it, prune old ones.

    Args:
        root: the run's checkpoints directory.
        step: optimiser steps taken.
        model_tensors: name -> tensor (adapter weights, EMA copies).
        optimizer_state: `optimizer.state_dict()`.
        state: JSON-able training state (step, epoch, rng, scaler, config, ...).
        keep: how many step checkpoints to keep (0 keeps all).

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    try:
        tmp.mkdir()
        atomic_write_bytes(tmp / "model.safetensors", _safetensors_bytes(model_tensors))
        atomic_write_bytes(tmp / "optimizer.safetensors", _safetensors_bytes(opt_tensors))
        payload = {"format": FORMAT_VERSION, **state, "optimizer": opt_meta}
        atomic_write_bytes(tmp / "state.json", json.dumps(payload, indent=1).encode())
        if final.exists():  # re-saving a step after a resume: drop the stale copy first
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write_bytes(root / LATEST, final.name.encode())
    _prune(root, keep, step)
    return str(final)


def step_of(path: Path) -> int | None:
    """The step of a `step-<step>` checkpoint directory, or None for any other path."""
    name = path.name
    if not (name.startswith("step-") and name[5:].isdigit() and path.is_dir()):
        return None
    return int(name[5:])


def _numbered(root: str | Path) -> list[tuple[int, Path]]:
    return sorted((step, p) for p in Path(root).glob("step-*") if (step := step_of(p)) is not None)


def step_checkpoints(root: str | Path) -> list[Path]:
    """The `step-*` checkpoint directories under root, in step order (not name order)."""
    return [p for _, p in _numbered(root)]


def _prune(root: Path, keep: int, current: int) -> None:
    """Keep `current` (just written; `latest` names it) and the keep - 1 newest checkpoints before it.

    Higher steps are left alone: they are not this run's past (a run resumed from an earlier checkpoint
    replaces them as it gets there), so they are not this call's to delete.
    """
    if keep <= 0:
        return
    pointer = root / LATEST
    protected = {f"step-{current:08d}", pointer.read_text().strip() if pointer.is_file() else ""}
    older = [p for step, p in _numbered(root) if step < current and p.name not in protected]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> str | None:
    """The directory `root/latest` names, or None when root holds no checkpoint yet.

    Raises:
        ValueError: `latest` names a checkpoint that is missing or incomplete, or root holds step
            checkpoints but no `latest`: resuming must not quietly start over.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        found = step_checkpoints(root)
        if found:
            raise ValueError(
                f"{root} holds checkpoints but no 'latest' file naming the newest complete one; resume one "
                f"explicitly with train.resume=<checkpoint> (found: {', '.join(str(p) for p in found)})"
            )
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which is missing or incomplete; {_fixes(root, path)}")
    return str(path)


def _fixes(root: Path, path: Path) -> str:
    """What to do instead of resuming `path`: the other checkpoints in root, or a fresh start."""
    others = [str(p) for p in step_checkpoints(root) if p != path]
    found = f"found: {', '.join(others)}" if others else "there are no others"
    return (
        f"resume another checkpoint with train.resume=<checkpoint> ({found}), or start over with "
        "train.overwrite=true (and no train.resume)"
    )


def _damaged(path: Path, name: str, err: Exception) -> ValueError:
    return ValueError(f"{path / name} is damaged ({type(err).__name__}: {err}); {_fixes(path.parent, path)}")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise TypeError(f"expected a JSON object, got {type(state).__name__}")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise _damaged(path, "state.json", err) from err
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    return state


def _load_tensors(path: Path, name: str, device: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors: dict[str, Tensor] = load_file(str(path / name), device=device)
    except SafetensorError as err:
        raise _damaged(path, name, err) from err
    return tensors


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory (safetensors + JSON only; nothing is unpickled).

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        ValueError: a file is damaged (truncated, not JSON, ...), naming it and what to do.
    """
    path = Path(path)
    missing = [n for n in ("model.safetensors", "optimizer.safetensors", "state.json") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: missing {missing}")
    state = _read_state(path)
    device = str(map_location)
    model = _load_tensors(path, "model.safetensors", device)
    opt_tensors = _load_tensors(path, "optimizer.safetensors", device)
    try:
        optimizer = unflatten_optimizer(opt_tensors, state.pop("optimizer"))
    except (KeyError, ValueError, TypeError, AttributeError) as err:  # a state.json that lost its optimizer part
        raise _damaged(path, "state.json", err) from err
    return Checkpoint(str(path), model, optimizer, state)
