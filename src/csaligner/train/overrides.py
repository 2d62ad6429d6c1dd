"""YAML and `--section.key=value` flags onto `RunConfig`, with type coercion and errors for people.

Both sources go through one path: a nested dict of raw values, checked key by key against the
dataclass fields (unknown keys rejected, naming the valid ones), coerced to the field types, then
built into the frozen dataclasses, whose `__post_init__` validates the values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from csaligner.train.config import RunConfig
from csaligner.train.stored_config import RUN_CONFIG_HEADER, drop_ignored_settings, trained_instead

T = TypeVar("T")


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), report: Callable[[str], object] | None = None
) -> RunConfig:
    """Read a YAML preset (optional) and apply dotted overrides such as "train.lr=1e-4".

    A run folder's config.yaml (it opens with `RUN_CONFIG_HEADER`) records a run that trained: settings an
    earlier version stored there that the run ignored, refused now, are dropped as the run trained
    (`drop_ignored_settings`, before the overrides) and named in a note. Any other file's are refused.

    Args:
        path: YAML file with sections data/model/loss/train; None starts from the defaults.
        overrides: "section.key=value" strings (a leading "--" is allowed); values parse as YAML
            scalars, then coerce to the field's type.
        report: called with the note on settings dropped from a run's config.yaml, e.g. `print`; None warns
            (UserWarning).

    Raises:
        ValueError: naming the unknown key or the bad value.
        FileNotFoundError: when `path` does not exist.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
        if Path(path).read_text().startswith(RUN_CONFIG_HEADER):
            raw = _as_trained(raw, str(path), report)
    given = set()
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        given.add(key)
    config = from_dict(RunConfig, raw)
    if path is not None and "train.epochs" in given and "train.steps" not in given and config.train.steps > 0:
        # the file's steps win (TrainConfig.epochs: "ignored when steps > 0"): the run would quietly keep its length
        raise ValueError(
            f"train.epochs={config.train.epochs} would be ignored: {path} sets train.steps={config.train.steps}, "
            "which fixes the run's length; add --train.steps=0 to train for the epochs given, or set "
            "--train.steps instead of --train.epochs"
        )
    return config


def _as_trained(raw: dict[str, Any], path: str, report: Callable[[str], object] | None) -> dict[str, Any]:
    """A run's stored config without the settings it ignored (`drop_ignored_settings`), saying which."""
    loaded = drop_ignored_settings(raw)
    instead = trained_instead(raw, loaded)
    if instead:
        note = (
            f"note: {path} was written by an earlier version with settings the run ignored, which are refused now; "
            f"it loads as the run trained: {', '.join(instead)}. Change them so in the file to load it without "
            "this note"
        )
        if report is None:
            warnings.warn(note, stacklevel=3)
        else:
            report(note)
    return loaded


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(_missing_config(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # a traceback from the parser names no fix
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}" if mark else str(err)  # type: ignore[union-attr]
        raise ValueError(f"{p} is not valid YAML ({where}); fix the file (see the presets in configs/)") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{p}: a config must be a mapping of sections (data, model, loss, train), got {type(data).__name__}"
        )
    return data


def _missing_config(p: Path) -> str:
    """Why `p` is no config file, and the YAML files a user likely meant (the folder's, or its parent's)."""
    folder = p if p.is_dir() else p.parent
    presets = sorted(str(f) for f in folder.glob("*.y*ml") if f.is_file()) if folder.is_dir() else []
    what = (
        f"config file {str(p)!r} is a folder, not a YAML file"
        if p.is_dir()
        else f"config file {str(p)!r} does not exist"
    )
    if not presets:
        return f"{what}; pass a YAML preset such as configs/flickr8k_cs_aligner.yaml (the presets are in configs/)"
    return f"{what}; pass one of the YAML files in {str(folder)!r}: {', '.join(presets)}"


def parse_override(item: str) -> tuple[str, str]:
    """Split "--train.lr=1e-4" (or "train.lr=1e-4") into ("train.lr", "1e-4")."""
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not key.split(".")[-1]:
        raise ValueError(f"override {item!r} must look like --section.key=value (e.g. --train.lr=1e-4)")
    return key, value


def split_cli_overrides(argv: Sequence[str]) -> list[str]:
    """Turn ["--train.lr", "1e-4", "--loss.lam=0.1"] into ["train.lr=1e-4", "loss.lam=0.1"]."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            out.append(arg[2:])
        else:
            value = next(it, None)
            if value is None:
                raise ValueError(f"override {arg} has no value; write {arg}=VALUE")
            out.append(f"{arg[2:]}={value}")
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating the intermediate mappings."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} holds the value {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, coercing each value to its field type."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - fields)
    if unknown:
        section = f"section {where!r}" if where else "the top level"
        raise ValueError(f"unknown key {_dot(where, unknown[0])!r} in {section}; valid keys: {sorted(fields)}")
    kwargs = {name: coerce(value, hints[name], _dot(where, name)) for name, value in raw.items()}
    _fill_kind(cls, kwargs)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or 'config'}: {err}") from err
    except ValueError as err:
        # LossConfig says "sigma must be ..."; the user wrote --loss.sigma (or loss: sigma: in the YAML)
        if not where or str(err).startswith(f"{where}.") or str(err).startswith(f"{where}:"):
            raise
        raise ValueError(f"{where}: {err}") from err


def _fill_kind(cls: type, kwargs: dict[str, Any]) -> None:
    """A mapping field whose default names a `kind` (model.image: {kind: mlp}) keeps that kind when the
    given mapping names none: `--model.image.mlp_ratio=4` tunes the default adapter instead of
    replacing it with a kind-less one."""
    for f in dataclasses.fields(cls):
        given = kwargs.get(f.name)
        if isinstance(given, dict) and "kind" not in given and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if isinstance(default, dict) and "kind" in default:
                kwargs[f.name] = {"kind": default["kind"], **given}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce a YAML value or a CLI string to the annotated type; raise naming `where` and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for member in sorted(args, key=lambda a: a is str):  # str last: "1.5" for float | str is a float
            try:
                return coerce(value, member, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{where}: no accepted type matches {value!r} ({'; '.join(errors)})")
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        raise ValueError(f"{where} must be null, got {value!r}")
    if origin in (dict, Mapping) or hint is dict:
        value = _yaml_scalar(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping like {{kind: mlp}}, got {value!r}")
        return {k: _yaml_scalar(v) if isinstance(v, str) else v for k, v in value.items()}
    if origin is tuple:
        return _coerce_tuple(value, args, where)
    return _coerce_scalar(value, hint, where)


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "1e-4" as a string; accept it
            except ValueError:
                pass
        raise ValueError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string, got {value!r}")
    raise ValueError(f"{where}: cannot coerce {value!r} to {hint}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        value = _yaml_scalar(value if value.strip().startswith("[") else f"[{value}]")
    if not isinstance(value, list | tuple) or len(value) != len(args):
        raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
    return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _yaml_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"cannot parse {text!r}: {err}") from err


def _dot(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def to_dict(config: Any) -> Any:
    """Plain nested dict/list/scalar form of a config (tuples become lists), for YAML and JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if type(config).__module__ == "numpy" and hasattr(config, "item"):  # np.float64(1e-4): YAML cannot write it
        return config.item()
    return config


def dump_yaml(config: RunConfig, header: str = "") -> str:
    """The resolved config as YAML (round-trips through `load_config`)."""
    import yaml

    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
    return (header.rstrip("\n") + "\n" if header else "") + text
