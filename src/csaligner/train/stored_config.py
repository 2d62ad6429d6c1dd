"""Stored run configs written by earlier versions: the settings a run ignores, dropped when they are read back.

Earlier versions accepted settings that the objective, an adapter kind, the token setup or the unpaired pools being
off ignored (loss.lam under infonce, model.text.mlp_ratio for a linear adapter, unpaired pools under infonce,
data.token_images with loss.token_lam 0, data.unpaired_batch_size with data.use_unpaired false) and wrote them into
checkpoints and run folders' config.yaml. `RunConfig` refuses them now; `drop_ignored_settings` turns such a stored
config into the one that says what the run did, so a resume, the demo's run reuse and `csalign train --config
<run>/config.yaml` keep working; `why_dropped` says, in a diff, why a stored value is not the one compared, and
`trained_instead` what was dropped to what.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csaligner._validation import is_number
from csaligner.losses.objective import DIVERGENCE_TERMS, LOSS_DEFAULTS, OBJECTIVES, ignored_settings
from csaligner.train.config import DATA_DEFAULTS, adapter_kinds

RUN_CONFIG_HEADER = "# resolved config"
"""How a run folder's config.yaml opens (every version wrote it): `load_config` reads such a file as the record
of a run that trained, dropping the settings it ignored."""


def drop_ignored_adapter_settings(
    config: dict[str, Any], widths: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, Any]:
    """A `to_dict` form of a run config without the model.image / model.text keys their kind ignores.

    Earlier versions accepted such keys and ignored them, so a checkpoint's stored config may hold them;
    a resume that had to delete them (they are refused now) continues the same model.

    Args:
        config: the stored config.
        widths: each side's (in_dim, out_dim) where known (a resume's model); a key those widths leave unused
            (mlp's bias when in_dim == out_dim) is dropped too. Without them, the mapping's own in_dim / out_dim.
    """
    from csaligner.adapters.config import drop_ignored_fields

    model = config.get("model")
    if not isinstance(model, dict):
        return config
    model = dict(model)
    for side in ("image", "text"):
        spec = model.get(side)
        if isinstance(spec, dict) and spec.get("kind") in adapter_kinds():
            model[side] = drop_ignored_fields(spec, None if widths is None else widths.get(side))
    return {**config, "model": model}


def drop_ignored_loss_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A `to_dict` form of a run config with the loss values its objective ignores set back to their defaults.

    Earlier versions accepted them (objective infonce with lam 0.5) and ignored them, so a checkpoint's or a
    run folder's stored config may hold them; a run that had to drop them (they are refused now) is the same.
    """
    loss = config.get("loss")
    if not isinstance(loss, dict):
        return config
    return {**config, "loss": {**loss, **{name: LOSS_DEFAULTS[name] for name in ignored_settings(loss)}}}


def ignored_data_settings(data: Mapping[str, Any], objective: str) -> dict[str, Any]:
    """The data settings `objective` has no term for, each with the value the run takes instead.

    Unpaired pools and CS-only captions enter only a distribution divergence (cs_aligner, mmd, kl); infonce
    and l2_prior train without them (`split_features(pools=False)`, `model_inputs`), so for those:
    use_unpaired=true with paired_fraction < 1 trains as use_unpaired=false, an unpaired_batch_size draws
    nothing, and captions_per_image_in_cs="all" beside captions_per_image="one" adds no caption. paired_fraction
    itself is read by every objective (fewer pairs). {} for an objective with a divergence or an unknown one.

    Args:
        data: `DataConfig`'s fields by name (its `__dict__` or a stored `to_dict` form); a missing field
            counts as its default.
        objective: the loss objective.
    """
    if objective not in OBJECTIVES or objective in DIVERGENCE_TERMS:
        return {}
    value: dict[str, Any] = {**DATA_DEFAULTS, **data}
    instead: dict[str, Any] = {}
    fraction = value["paired_fraction"]
    if value["use_unpaired"] is True and is_number(fraction) and fraction < 1:
        instead["use_unpaired"] = False
    if value["unpaired_batch_size"] != DATA_DEFAULTS["unpaired_batch_size"]:
        instead["unpaired_batch_size"] = DATA_DEFAULTS["unpaired_batch_size"]
    if value["captions_per_image"] == "one" and value["captions_per_image_in_cs"] == "all":
        instead["captions_per_image_in_cs"] = "one"
    return instead


def drop_ignored_data_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A `to_dict` form of a run config with the data values its objective has no term for set to what the
    run took instead (`ignored_data_settings`).

    Earlier versions accepted them (objective infonce with unpaired_batch_size 256) and dropped the pools, so
    a checkpoint's or a run folder's stored config may hold them; a run that had to drop them is the same.
    """
    data, loss = config.get("data"), config.get("loss")
    if not isinstance(data, dict):
        return config
    objective = loss.get("objective", LOSS_DEFAULTS["objective"]) if isinstance(loss, dict) else None
    if not isinstance(objective, str):
        return config
    return {**config, "data": {**data, **ignored_data_settings(data, objective)}}


def ignored_unpaired_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """The unpaired-data settings that data.use_unpaired=false leaves nothing to act on, each with the value the run
    takes instead.

    use_unpaired=false empties the unpaired pools (`split_features`), so an unpaired_batch_size draws nothing from
    them under any objective. use_unpaired=true keeps it, even with paired_fraction 1: images without a caption and
    texts without an image form pools too. {} when use_unpaired is not false.

    Args:
        data: `DataConfig`'s fields by name; a missing field counts as its default.
    """
    value: dict[str, Any] = {**DATA_DEFAULTS, **data}
    if value["use_unpaired"] is False and value["unpaired_batch_size"] != DATA_DEFAULTS["unpaired_batch_size"]:
        return {"unpaired_batch_size": DATA_DEFAULTS["unpaired_batch_size"]}
    return {}


def drop_ignored_unpaired_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A `to_dict` form of a run config with the data values use_unpaired=false leaves unread set to what the run
    took instead (`ignored_unpaired_settings`).

    Earlier versions accepted data.unpaired_batch_size=256 beside data.use_unpaired=false and drew nothing with it,
    so a stored config may hold it; the run is the same.
    """
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    return {**config, "data": {**data, **ignored_unpaired_settings(data)}}


def ignored_token_settings(data: Mapping[str, Any], token_lam: Any, text_kind: Any) -> dict[str, Any]:
    """The token data settings nothing reads, each with the value the run takes instead.

    Image tokens and data.token_images enter only the token-level CS term (loss.token_lam > 0: `model_inputs`).
    Text tokens enter that term and the text adapter, which only a kind that reads them uses (`reads_text_tokens`:
    the prior). So with token_lam 0, token_images > 0 picks nothing, and use_tokens=true beside a text adapter
    that ignores tokens (mlp, linear, identity) loads features nothing reads. {} when token_lam > 0, and for a
    token_lam that is no number (the config refuses it) or an unregistered kind's use_tokens.

    Args:
        data: `DataConfig`'s fields by name; a missing field counts as its default.
        token_lam: loss.token_lam.
        text_kind: model.text's kind.
    """
    from csaligner.adapters.registry import ADAPTERS, reads_text_tokens

    if not is_number(token_lam) or token_lam > 0:
        return {}
    value: dict[str, Any] = {**DATA_DEFAULTS, **data}
    instead: dict[str, Any] = {}
    text_adapter = ADAPTERS.get(text_kind) if isinstance(text_kind, str) else None
    if value["use_tokens"] is True and text_adapter is not None and not reads_text_tokens(text_adapter):
        instead["use_tokens"] = False
    if value["token_images"] != DATA_DEFAULTS["token_images"]:
        instead["token_images"] = DATA_DEFAULTS["token_images"]
    return instead


def token_readers() -> list[str]:
    """The registered adapter kinds that read text tokens (the prior), for messages."""
    from csaligner.adapters.registry import ADAPTERS, reads_text_tokens

    return sorted(kind for kind, cls in ADAPTERS.items() if reads_text_tokens(cls))


def drop_ignored_token_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A `to_dict` form of a run config with the token data values nothing reads set to what the run took instead
    (`ignored_token_settings`).

    Earlier versions accepted data.token_images=64 and data.use_tokens=true beside an mlp text adapter with
    loss.token_lam=0 and trained as without them, so a stored config may hold them; the run is the same.
    """
    data, loss = config.get("data"), config.get("loss", {})  # no loss section: LossConfig's defaults
    if not isinstance(data, dict):
        return config
    token_lam = loss.get("token_lam", LOSS_DEFAULTS["token_lam"]) if isinstance(loss, dict) else None
    return {**config, "data": {**data, **ignored_token_settings(data, token_lam, _text_kind(config))}}


def _text_kind(config: Mapping[str, Any]) -> object:
    """model.text's kind in a stored config; where it names none, the kind loading it gives (ModelConfig's)."""
    from csaligner.train.config import ModelConfig

    model = config.get("model", {})
    text = model.get("text", {}) if isinstance(model, Mapping) else None
    if isinstance(text, Mapping) and "kind" not in text:
        return ModelConfig().text["kind"]
    return text.get("kind") if isinstance(text, Mapping) else None


def drop_ignored_settings(
    config: dict[str, Any], widths: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, Any]:
    """`drop_ignored_adapter_settings` (with `widths`), `drop_ignored_loss_settings`, `drop_ignored_data_settings`,
    `drop_ignored_unpaired_settings` and `drop_ignored_token_settings`: a stored run config as it loads now."""
    config = drop_ignored_loss_settings(drop_ignored_adapter_settings(config, widths))
    config = drop_ignored_unpaired_settings(drop_ignored_data_settings(config))
    return drop_ignored_token_settings(config)


def why_dropped(key: str, config: Mapping[str, Any]) -> str:
    """Who ignored a stored setting that was dropped: the objective (loss.*, data.*), the unpaired pools being off
    (data.unpaired_batch_size under an objective with a divergence), the token-level CS term being off
    (data.token_images, data.use_tokens) or the side's kind (model.*)."""
    section, _, rest = key.partition(".")

    def part(mapping: object, name: str) -> Any:
        return mapping.get(name) if isinstance(mapping, Mapping) else None

    if key in ("data.token_images", "data.use_tokens"):
        lam = f"loss.token_lam={part(config.get('loss'), 'token_lam') or 0.0!r}"
        if key == "data.token_images":
            return f"{lam} turns off the token-level CS term, the only one that reads it"
        return f"neither the token-level CS term ({lam}: off) nor text kind {_text_kind(config)!r} reads tokens"
    objective = part(config.get("loss"), "objective") or LOSS_DEFAULTS["objective"]
    if key == "data.unpaired_batch_size" and (objective not in OBJECTIVES or objective in DIVERGENCE_TERMS):
        return "data.use_unpaired=false left no unpaired pools for it to draw from"  # not the objective's doing
    if section != "model":
        return f"objective {objective!r} ignored it"
    side, _, name = rest.partition(".")
    kind = part(part(config.get("model"), side), "kind")
    from csaligner.adapters.registry import ADAPTERS

    reads = getattr(ADAPTERS.get(kind) if isinstance(kind, str) else None, "settings", None) or ()
    return f"kind {kind!r} ignored it" + (" at these widths" if name in reads else "")


def trained_instead(stored: Mapping[str, Any], loaded: Mapping[str, Any]) -> list[str]:
    """What the run trained with in place of each stored value refused now: one phrase per setting that
    `drop_ignored_settings` changed from `stored` to `loaded`.

    Told to take a checkpoint's values, a resume cannot take these (the config refuses them), and a run's
    config.yaml loads without them; the run trained as with the loaded value, so that is the one to give, or,
    for an adapter key dropped, none.

    Args:
        stored: the config as written (a `to_dict` form).
        loaded: `drop_ignored_settings(stored)`.

    Returns:
        e.g. ["loss.lam=0.01 (stored: 0.5)", "model.text.mlp_ratio left out (stored: 2)"], sorted by key.
    """
    written, kept = flatten(stored), flatten(loaded)
    return [
        f"{key}={_flag_value(kept[key])} (stored: {value!r})" if key in kept else f"{key} left out (stored: {value!r})"
        for key, value in sorted(written.items())
        if key not in kept or kept[key] != value
    ]


def _flag_value(value: Any) -> str:
    """A value as a --section.key flag writes it: true / false for a bool."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"lam": 0.5}} -> {"loss.lam": 0.5}: a nested config by dotted key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
