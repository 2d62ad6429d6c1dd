"""`AdapterConfig`: one frozen dataclass describing any adapter, validated on construction.

Every kind reads the fields it needs (its class's `settings`) and ignores the rest. A field the kind
ignores is refused when it differs from its default: `AdapterConfig(kind="linear", ..., mlp_ratio=8)`
would build the same linear layer as without it. The dataclass cannot tell a default from a given
value; a config written by a person (a training run's model.image / model.text mapping) holds only
the fields given, so `check_settings_apply` refuses one the kind ignores even at its default value.
A saved adapter's JSON metadata holds every field (`dataclasses.asdict`); one written before these
checks may hold an ignored value, which `drop_ignored_fields` removes when the file is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from csaligner._validation import is_integer, is_number, numpy_hint
from csaligner.adapters.registry import ADAPTERS, Adapter


@dataclass(frozen=True)
class AdapterConfig:
    """Configuration of a trainable adapter on frozen features (the `adapter:` YAML section).

    Example:
        >>> cfg = AdapterConfig(kind="prior", in_dim=768, out_dim=768)   # Eclipse prior, paper sizes
        >>> cfg = AdapterConfig(kind="mlp", in_dim=512, out_dim=512, mlp_ratio=4, mlp_alpha=0.2)
    """

    kind: str
    """Registered adapter name: "prior", "mlp", "linear", "identity" or one added with
    `@register_adapter`."""
    in_dim: int
    """Width D_in of the input features (the pooled text embedding for "prior")."""
    out_dim: int
    """Width D_out of the output features (the image-embedding width, e.g. 768 or 1280)."""
    bias: bool = True
    """Bias on the "linear" layer and on the "mlp" side projection. An "mlp" with in_dim == out_dim has no
    side projection (the identity), so it has no bias and refuses bias=False, which would change nothing."""
    mlp_ratio: int = 4
    """"mlp": bottleneck ratio; the hidden width is in_dim // mlp_ratio (CLIP-Adapter uses 4)."""
    mlp_alpha: float = 0.2
    """"mlp": residual ratio alpha in y = alpha * MLP(x) + (1 - alpha) * proj(x); 0 keeps the input."""
    num_layers: int = 10
    """"prior": transformer blocks (paper Appendix F: 10)."""
    num_heads: int = 16
    """"prior": attention heads (paper: 16)."""
    head_dim: int = 32
    """"prior": width of one head (paper: 32); the inner width is num_heads * head_dim."""
    dropout: float = 0.0
    """"prior": dropout on attention weights and residual branches (paper: 0)."""
    num_learned_tokens: int = 3
    """"prior": learned embeddings appended after the pooled text; the last is the output query."""
    max_text_tokens: int = 77
    """"prior": longest text-token sequence accepted (CLIP's context length is 77)."""
    token_dim: int | None = None
    """"prior": width of the text token states; None means the same as in_dim."""
    causal: bool = True
    """"prior": causal self-attention (as diffusers' PriorTransformer); False attends both ways."""

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose one of {sorted(ADAPTERS)}")
        _check_int("in_dim", self.in_dim)
        _check_int("out_dim", self.out_dim)
        _check_int("mlp_ratio", self.mlp_ratio)
        # only "mlp" has a hidden layer: the default ratio 4 must not refuse a 2-d linear adapter
        if self.kind == "mlp" and self.in_dim // self.mlp_ratio < 1:
            raise ValueError(
                f"mlp_ratio={self.mlp_ratio} leaves no hidden unit for in_dim={self.in_dim} "
                f"(hidden = in_dim // mlp_ratio = 0); use mlp_ratio <= {self.in_dim}"
            )
        # plain: the config is saved as JSON (save_adapter), which cannot write np.float32
        if not (is_number(self.mlp_alpha, plain=True) and 0.0 <= self.mlp_alpha <= 1.0):
            raise ValueError(
                f"mlp_alpha must be a number in [0, 1] (the residual ratio), got {self.mlp_alpha!r}"
                + numpy_hint(self.mlp_alpha, integer=False)
            )
        for name in ("num_layers", "num_heads", "head_dim", "num_learned_tokens", "max_text_tokens"):
            _check_int(name, getattr(self, name))
        if self.token_dim is not None:
            _check_int("token_dim", self.token_dim)
        if not (is_number(self.dropout, plain=True) and 0.0 <= self.dropout < 1.0):
            raise ValueError(
                f"dropout must be a number in [0, 1), got {self.dropout!r}"
                f"{numpy_hint(self.dropout, integer=False)}; the paper uses 0"
            )
        if self.kind == "identity" and self.in_dim != self.out_dim:
            raise ValueError(
                f'kind="identity" needs in_dim == out_dim, got in_dim={self.in_dim}, out_dim={self.out_dim}; '
                'use kind="linear" to change the width'
            )
        self._check_settings_apply()

    def _check_settings_apply(self) -> None:
        """Refuse a field the kind ignores that differs from its default (a default is not a setting)."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}  # a subclass's own
        changed = {n: getattr(self, n) for n in KIND_FIELDS if n not in defaults or getattr(self, n) != defaults[n]}
        check_settings_apply(self.kind, changed, where="", values=changed, widths=(self.in_dim, self.out_dim))

    @property
    def inner_dim(self) -> int:
        """Width of the prior transformer's residual stream: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def text_token_dim(self) -> int:
        """Width of the text token states the prior accepts (token_dim, or in_dim when None)."""
        return self.in_dim if self.token_dim is None else self.token_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError instead of being dropped silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"adapter config has unknown field(s) {unknown}; known fields are {sorted(known)} "
                "(was it written by a newer csaligner?)"
            )
        return cls(**data)


BASE_FIELDS = ("kind", "in_dim", "out_dim")
"""The `AdapterConfig` fields every kind reads."""
KIND_FIELDS = tuple(f.name for f in fields(AdapterConfig) if f.name not in BASE_FIELDS)
"""The `AdapterConfig` fields a kind may read or ignore (its class's `settings` says which it reads)."""


def kind_settings(kind: str) -> tuple[str, ...] | None:
    """The fields `kind` reads besides `BASE_FIELDS` (its class's `settings`); None when it does not say.

    Args:
        kind: a registered adapter name.
    """
    cls = ADAPTERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    return None if cls.settings is None else tuple(cls.settings)


def check_settings_apply(
    kind: str,
    names: Iterable[str],
    where: str = "adapter",
    values: Mapping[str, Any] | None = None,
    widths: tuple[int, int] | None = None,
) -> None:
    """Refuse settings that `kind` does not read: given, they would change nothing without a word.

    Call it on the fields a person gave (a YAML mapping, CLI flags), not on every field of a full
    `AdapterConfig`, whose defaults fill every field whatever the kind (`AdapterConfig` itself checks
    the fields that differ from their defaults).

    Args:
        kind: a registered adapter name.
        names: the given field names; unknown names are left to the caller's unknown-key check.
        where: prefix of the setting in the message, e.g. "model.text"; "" for none.
        values: the given values by name, to name each refused setting's value in the message.
        widths: (in_dim, out_dim) of the adapter, when known: a setting the kind reads but these widths
            leave unused (`Adapter.unused_settings`: mlp's bias when in_dim == out_dim) is refused too.

    Raises:
        ValueError: naming each setting, the kinds that use it, and the settings `kind` takes.
    """
    takes = kind_settings(kind)
    if takes is None:
        return
    names = list(names)
    prefix = f"{where}." if where else ""
    shown = {n: f"={values[n]!r}" if values is not None and n in values else "" for n in names}
    ignored = [n for n in names if n in KIND_FIELDS and n not in takes]
    if not ignored:
        _refuse_unused(kind, names, widths, prefix, shown)
        return
    named = ", ".join(f"{prefix}{n}{shown[n]} (used by {_users(n)})" for n in ignored)
    verb, it = ("does", "it") if len(ignored) == 1 else ("do", "them")
    accepted = f"only {', '.join(takes)}" if takes else "no settings"
    cls = ADAPTERS[kind]
    # Only a user's class that inherits `settings` is told to list them; one that lists them gave them already.
    own = "" if cls.__module__.startswith("csaligner.") or "settings" in vars(cls) else (
        f" ({cls.__name__} is your class: list every setting its from_config reads in its `settings` "
        "class attribute, which it otherwise inherits)"
    )  # fmt: skip
    raise ValueError(
        f"{named} {verb} not apply to kind={kind!r}, which takes {accepted} besides {', '.join(BASE_FIELDS)}: "
        f"remove {it} or choose a kind that uses {it}{own}"
    )


def _refuse_unused(
    kind: str, names: list[str], widths: tuple[int, int] | None, prefix: str, shown: Mapping[str, str]
) -> None:
    """Refuse the given settings that `kind` reads but `widths` leave unused (`Adapter.unused_settings`)."""
    unused = _unused_settings(ADAPTERS.get(kind), widths)
    idle = [n for n in names if n in unused]
    if not idle or widths is None:
        return
    at = f"kind={kind!r} with in_dim={widths[0]}, out_dim={widths[1]}"
    it = "it" if len(idle) == 1 else "them"
    raise ValueError(
        "; ".join(f"{prefix}{n}{shown[n]} does not apply to {at}: {unused[n]}" for n in idle) + f"; remove {it}"
    )


def drop_ignored_fields(data: Mapping[str, Any], widths: tuple[int, int] | None = None) -> dict[str, Any]:
    """An `AdapterConfig` mapping without the fields its kind ignores, so `from_dict` gives them their defaults.

    Saved adapters hold every field, and earlier versions saved whatever value a kind ignored; reading such
    a file keeps working, and builds the same adapter. Unknown fields and kinds are kept for `from_dict`
    to refuse.

    Args:
        data: `AdapterConfig` fields by name: a saved adapter's full config or a run's model.image /
            model.text mapping.
        widths: (in_dim, out_dim) of the adapter, for a mapping that leaves them to be inferred; without
            it, data's own in_dim / out_dim. A setting these widths leave unused is dropped as well.
    """
    kind = data.get("kind")
    cls = ADAPTERS.get(kind) if isinstance(kind, str) else None
    if cls is None or cls.settings is None:
        return dict(data)
    if widths is None:
        widths = (data.get("in_dim", 0), data.get("out_dim", 0))
    unused = _unused_settings(cls, widths)
    return {k: v for k, v in data.items() if k not in KIND_FIELDS or (k in cls.settings and k not in unused)}


def _unused_settings(cls: type[Adapter] | None, widths: tuple[Any, Any] | None) -> dict[str, str]:
    """`cls.unused_settings` at these widths; {} when the widths are unknown (0: to be inferred)."""
    if cls is None or widths is None or not all(is_integer(w, plain=True) and w > 0 for w in widths):
        return {}
    return cls.unused_settings(*widths)


def _users(name: str) -> str:
    """ "kind 'mlp'" / "kinds 'linear', 'mlp'": the registered kinds whose declared settings include `name`."""
    kinds = sorted(k for k, cls in ADAPTERS.items() if cls.settings is not None and name in cls.settings)
    if not kinds:
        return "no registered kind"
    return f"kind{'s' if len(kinds) > 1 else ''} {', '.join(repr(k) for k in kinds)}"


def _check_int(name: str, value: int) -> None:
    # bool is an int subclass; True as a width is always a mistake. A plain int: the config goes to JSON.
    if not is_integer(value, plain=True) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{numpy_hint(value)}")
