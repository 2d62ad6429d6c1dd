"""Input checks shared by every public function.

Errors are for people: each one names the offending argument and value and says what to do.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class _FiniteRecord:
    """Within one `checks_finite_once` call: what is known about the finiteness of its tensors."""

    seen: dict[tuple[str, int], tuple[Tensor, int]] = field(default_factory=dict)
    """(check, id) -> the tensor and its version, for each tensor that passed a check so far: "finite",
    or a caller's own (`checked_already`); the tensors are kept alive so an id is not reused."""
    stand_ins: dict[int, tuple[Tensor, str, Tensor, int | None]] = field(default_factory=dict)
    """Tensors whose test also tests another's (`defer_finite_check`): id -> (stand-in, source name,
    source, the source's version then: None for an inference tensor, which has none)."""


_FINITE: ContextVar[_FiniteRecord | None] = ContextVar("csaligner_finite_record", default=None)


def checks_finite_once(fn: _F) -> _F:
    """Within a call of fn (and everything it calls), check_features tests each tensor's values once.

    A loss entry point checks its features and hands the same tensors to the functions it calls,
    which check them again; each test is a device-to-host sync (`isfinite(x).all()`), a GPU pipeline
    drain, seven of them per loss call before this. A tensor changed in place since its test (its
    version counter moved) is tested again; the record ends with the outermost call.

    Sources deferred within a call (`defer_finite_check`) and not yet tested are tested when it
    returns, and when it raises another error: a NaN input is reported first, as if tested on entry
    (the read costs nothing then); either way none is left for the next call to trip over."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record = _FINITE.get()
        token = None
        if record is None:
            record = _FiniteRecord()
            token = _FINITE.set(record)
        before = set(record.stand_ins)
        try:
            try:
                out = fn(*args, **kwargs)
            except Exception as err:
                if not isinstance(err, NonFiniteFeaturesError):
                    _test_stand_ins(record, before)  # raises for a non-finite input, chaining err
                raise
            _test_stand_ins(record, before)  # no path tested them (e.g. an objective that tests nothing)
            return out
        finally:
            for key in set(record.stand_ins) - before:  # after an error: this call's, untested
                del record.stand_ins[key]
            if token is not None:
                _FINITE.reset(token)

    return wrapper  # type: ignore[return-value]


def needs_finite_check(x: Tensor) -> bool:
    """Whether `check_features` would test x's values now (not yet found finite within this
    `checks_finite_once` call). A caller that tests them itself, folded into a host read it makes
    anyway, raises `non_finite_error(name, x)` or calls `record_finite`."""
    return not _finite_already(x)


def record_finite(x: Tensor) -> None:
    """Record x as tested finite within the current `checks_finite_once` call (see `needs_finite_check`)."""
    _record_finite(x)


def defer_finite_check(name: str, source: Tensor, derived: Tensor) -> None:
    """Let the first test of `derived` stand for a test of `source`, named `name` in its error.

    For a loss that casts or L2-normalises its inputs before the fast path, which folds the test of
    what it is handed into a host read it makes anyway: testing the inputs first would be one GPU
    sync each. A row of `derived` must be non-finite exactly when that row of `source` is (a cast
    to a wider dtype, `F.normalize`). Within a `checks_finite_once` call the test happens at the
    first `check_features` of any tensor (so the inputs' errors come first, in the order deferred),
    in a caller's own read (`needs_finite_check`), or at the latest when the decorated call that
    deferred it returns or raises another error; outside one, now.
    """
    if _finite_already(source):
        _record_finite(derived)
        return
    record = _FINITE.get()
    if record is None:
        _test_finite(name, source)
        return
    record.stand_ins[id(derived)] = (derived, name, source, None if source.is_inference() else source._version)


def non_finite_error(name: str, x: Tensor) -> NonFiniteFeaturesError:
    """The error for x, found not finite: it names and counts x's source when x stands in for one."""
    record = _FINITE.get()
    hit = record.stand_ins.get(id(x)) if record is not None else None
    if hit is not None and hit[0] is x:
        _, source_name, source, _ = hit
        n_bad = _count_non_finite(source)
        if n_bad:  # 0 only if the derivation broke its contract; then report x as it is
            return NonFiniteFeaturesError(source_name, n_bad, source.shape[:-1].numel())
    return NonFiniteFeaturesError(name, _count_non_finite(x), x.shape[:-1].numel())


def _count_non_finite(x: Tensor) -> int:
    """Feature vectors (last dim) holding a NaN or an Inf."""
    return int((~torch.isfinite(x)).any(dim=-1).sum())


def _all_finite(x: Tensor) -> bool:
    """The test itself: one device-to-host read (a GPU sync)."""
    return bool(torch.isfinite(x).all())


def _test_finite(name: str, x: Tensor) -> None:
    if not _all_finite(x):
        raise non_finite_error(name, x)
    _record_finite(x)


def _test_stand_ins(record: _FiniteRecord | None = None, keep: set[int] | None = None) -> None:
    """Test the sources waiting on stand-ins, in the order deferred (but those in `keep`: an outer call's)."""
    if record is None:
        record = _FINITE.get()
    while record is not None:
        waiting = [hit for key, hit in record.stand_ins.items() if keep is None or key not in keep]
        if not waiting:
            return
        _test_finite(waiting[0][1], waiting[0][0])


def checked_already(check: str, x: Tensor) -> bool:
    """Whether x, unchanged since, passed `check` (a name, with whatever parameters it depends on)
    within the current `checks_finite_once` call; see `record_checked`."""
    record = _FINITE.get()
    if record is None or x.is_inference():  # an inference tensor has no version counter to see a change by
        return False
    hit = record.seen.get((check, id(x)))
    return hit is not None and hit[0] is x and hit[1] == x._version


def record_checked(check: str, x: Tensor) -> None:
    """Record that x passed `check` within the current `checks_finite_once` call (outside one: nothing),
    so that the functions it is handed to skip the test and its host read."""
    record = _FINITE.get()
    if record is not None and not x.is_inference():  # x._version raises on one: it is tested each time
        record.seen[(check, id(x))] = (x, x._version)


def _finite_already(x: Tensor) -> bool:
    return checked_already("finite", x)


def _record_finite(x: Tensor) -> None:
    record = _FINITE.get()
    if record is None:
        return
    hit = record.stand_ins.get(id(x))
    if hit is not None and hit[0] is x:
        del record.stand_ins[id(x)]
        source, version = hit[2], hit[3]
        if version is not None and source._version == version:  # unchanged since x was made from it
            _record_finite(source)  # finite too
    record_checked("finite", x)


def check_features(name: str, x: Tensor, ndim: int = 2, finite: bool = True) -> None:
    """Check a feature tensor: a floating tensor of `ndim` dims, non-empty, finite.

    Args:
        name: argument name used in the error message.
        x: the tensor, e.g. (N, D) pooled features or (B, T, D) tokens.
        ndim: expected number of dimensions.
        finite: also require every value to be finite (`check_tokens` checks only the real tokens).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        shape = "(N, D)" if ndim == 2 else "(B, T, D)"
        raise ValueError(f"{name} must have shape {shape} ({ndim} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}; cast it with .float()")
    if x.numel() == 0 or any(s == 0 for s in x.shape):
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample with D > 0")
    if finite and not _finite_already(x):
        _test_stand_ins()  # deferred inputs first: their errors name what the caller passed
        if not _finite_already(x):
            _test_finite(name, x)


def check_tensor(name: str, value: object, what: str) -> None:
    """Refuse a list or an array where a tensor goes, naming the argument and the conversion.

    Args:
        name: argument name used in the error message.
        value: the argument.
        what: what the tensor holds, e.g. "image row indices".
    """
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of {what}, got {type(value).__name__}; "
            f"convert it with torch.as_tensor({name})"
        )


def check_tokens(name: str, tokens: Tensor, mask_name: str, mask: Tensor | None) -> Tensor:
    """Check (B, T, D) tokens and their (B, T) mask (see `check_token_mask`); return the bool mask.

    Only the real tokens must be finite: padding commonly holds garbage, even NaN, and every
    consumer ignores it (it must zero it with `masked_fill`/`where` before any arithmetic, since
    0 * NaN is NaN in a masked sum, a matmul or a backward pass).
    """
    check_features(name, tokens, ndim=3, finite=False)
    m = check_token_mask(mask_name, mask, tokens)
    bad = ~torch.isfinite(tokens).all(dim=-1) & m  # (B, T) real tokens with NaN or Inf
    if bad.any():
        raise NonFiniteFeaturesError(name, int(bad.sum()), int(m.sum()), what="real (unmasked) tokens")
    return m


class NonFiniteFeaturesError(ValueError):
    """Features with NaN or Inf; a trainer catches it to say what it means there (a diverged step)."""

    def __init__(self, name: str, n_bad: int, total: int, what: str = "feature vectors") -> None:
        self.name, self.n_bad, self.total = name, n_bad, total
        super().__init__(
            f"{name} contains NaN or Inf in {n_bad} of {total} {what}; "
            "check the encoder output or the data (a corrupt image, a zero-length caption)"
        )


def check_same_dim(name_x: str, x: Tensor, name_y: str, y: Tensor) -> None:
    """Both modalities must live in the same feature space (same last dim)."""
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"feature dims differ: {name_x} has D={x.shape[-1]}, {name_y} has D={y.shape[-1]}; "
            "project one modality with an adapter (csaligner.build_adapter) before computing the loss"
        )


def is_number(value: object, *, plain: bool = False) -> bool:
    """True for a finite real number (int, float or a numpy scalar), False for a bool.

    bool is an int subclass, so `lam=True` would otherwise read as 1.0: a flag passed in the wrong
    place, not a number. A numeric string ("0.1") is not a number either; configs read from YAML
    are coerced to their field types before they get here.

    plain=True admits only a Python int or float (np.float64 is a float subclass): a field written
    with `json.dumps` as it is, where np.float32 does not serialise.
    """
    kind = (int, float) if plain else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object, *, plain: bool = False) -> bool:
    """True for an int or a numpy integer, False for a bool (True is not a count or a size).

    plain=True admits only a Python int: config fields are written to YAML and JSON, where numpy
    integers do not serialise.
    """
    kind = int if plain else numbers.Integral
    return isinstance(value, kind) and not isinstance(value, bool)


def numpy_hint(value: object, *, integer: bool = True) -> str:
    """The fix for a numpy scalar where a plain Python number must go ("" for any other value).

    Config fields are written to YAML and JSON, which take Python int and float but not numpy scalars.
    `integer`: the field takes only an integer, so a numpy float gets no hint (float(value) would be refused
    too); pass False for a float field.
    """
    if is_integer(value) and not is_integer(value, plain=True):
        return " (a numpy integer: pass int(value), as the config is saved as YAML/JSON)"
    if not integer and is_number(value) and not is_number(value, plain=True):
        return " (a numpy number: pass float(value), as the config is saved as YAML/JSON)"
    return ""


def check_positive(name: str, value: float | Tensor, read: bool = True) -> None:
    """A bandwidth or temperature must be one finite positive number: a float, or a tensor of one element
    (0-dim, or shape (1,)); a tensor of several would broadcast into the logits, one value per column.

    read=False checks a tensor's shape only: for a caller that reads its value to the host anyway
    (a GPU sync each) and then calls `check_positive_value` on it."""
    if isinstance(value, bool):  # float(True) == 1.0: a flag passed in the wrong place, not a bandwidth
        raise ValueError(f"{name} must be a finite number > 0, got the bool {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(
                f"{name} must be a single number (a float or a 0-dim tensor), got a tensor of shape "
                f"{tuple(value.shape)}; pass one value, e.g. {name}.reshape(()) for a one-element tensor"
            )
        if read:
            check_positive_value(name, float(value.detach()), shown=value)
        return
    check_positive_value(name, float(value) if is_number(value) else math.nan, shown=value)


def check_positive_value(name: str, value: float, shown: object = None) -> None:
    """The value test of `check_positive`, on a number the caller has read (from `shown`, which the
    error quotes as the caller passed it, when given: a tensor's float32 value read as a double
    would show digits the user never wrote)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value if shown is None else shown!r}")


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Rows per strip: None (sized to the batch) or a positive integer; returned as a plain int (or None)."""
    if chunk_size is None:
        return None
    # a size computed with numpy (np.int64) is an integer too; True is not
    if not is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per strip) or None, got {chunk_size!r}")
    return int(chunk_size)


def check_weights(name: str, w: Tensor | None, n: int, ref: Tensor) -> Tensor | None:
    """Validate per-sample weights or a boolean mask of length n; return float weights in ref's dtype, or None."""
    if w is None:
        return None
    check_tensor(name, w, "per-sample weights or a boolean mask")
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {tuple(w.shape)}")
    # in ref's dtype: float32 weights would round float64 ones (1e-9 off a float64 reference)
    wf = w.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    seen = wf.detach()  # checked without a warning for weights that require grad
    if not torch.isfinite(seen).all() or (seen < 0).any():
        raise ValueError(f"{name} must be finite and >= 0 (a mask or weights), got min {float(seen.min())}")
    if float(seen.sum()) <= 0:
        raise ValueError(f"{name} selects no sample (all weights are zero); keep at least one sample")
    return wf


def check_token_mask(name: str, mask: Tensor | None, tokens: Tensor) -> Tensor:
    """Return a boolean (B, T) mask (all True when None); every sample must keep at least one token."""
    b, t = tokens.shape[:2]
    if mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=tokens.device)
    check_tensor(name, mask, "token flags (True for real tokens)")
    if mask.shape != (b, t):
        raise ValueError(f"{name} must have shape ({b}, {t}) to match the tokens, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        # An attention mask is 0/1 (bool or int, like HF's); soft weights would silently count as 1
        raise ValueError(f"{name} must be bool or hold only 0 and 1 (True for real tokens), got other values")
    m = mask.to(device=tokens.device).bool()
    empty = (~m.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{name} leaves {empty.numel()} sample(s) with no tokens (batch indices {empty[:10].tolist()}); "
            "every sample needs at least one unmasked token"
        )
    return m


def check_device(flag: str, device: str) -> None:
    """A `--device` value names a device torch knows and this machine has.

    torch otherwise fails deep inside model loading ("Torch not compiled with CUDA enabled", or a list
    of twenty device types for a typo) with a traceback that names no flag.

    Args:
        flag: the option as the user wrote it ("--device"), for the message.
        device: its value, e.g. "cpu", "cuda", "cuda:1".
    """
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{flag} {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device!r} but CUDA is not available here; use {flag} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use an index below {torch.cuda.device_count()}"
            )
