"""The trainable part of a run: an image adapter and a text adapter on frozen features.

Adapters come from `csaligner.adapters` (imported inside functions so this module imports
without it). `AlignmentModel.forward` maps every feature a step needs in one call per side, which
is what DistributedDataParallel wants: one forward, one backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from csaligner.train.config import ModelConfig


def _adapter_api() -> Any:
    try:
        import csaligner.adapters as adapters

        for name in ("AdapterConfig", "build_adapter", "check_settings_apply", "save_adapter", "load_adapter"):
            getattr(adapters, name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            "csaligner.adapters (AdapterConfig, build_adapter, check_settings_apply, save_adapter, load_adapter) is "
            "not available; "
            f"training needs it ({err})"
        ) from err
    return adapters


def resolve_out_dim(config: ModelConfig, image_dim: int, text_dim: int) -> int:
    """The shared dim: model.out_dim, else the identity side's dim, else the image dim."""
    if config.out_dim:
        return config.out_dim
    if config.text["kind"] == "identity":
        return text_dim
    return image_dim


def adapter_configs(config: ModelConfig, image_dim: int, text_dim: int) -> dict[str, Any]:
    """AdapterConfig of each side ("image", "text"), with in_dim/out_dim filled from the features."""
    api = _adapter_api()
    out_dim = resolve_out_dim(config, image_dim, text_dim)
    configs = {}
    for side, spec, feat_dim in (("image", config.image, image_dim), ("text", config.text, text_dim)):
        full = {**spec, "in_dim": spec.get("in_dim") or feat_dim, "out_dim": spec.get("out_dim") or out_dim}
        if full["in_dim"] != feat_dim:
            raise ValueError(
                f"model.{side}.in_dim={full['in_dim']} but the {side} features have D={feat_dim}; "
                "leave in_dim out (0) to infer it"
            )
        if full["out_dim"] != out_dim:
            raise ValueError(
                f"model.{side}.out_dim={full['out_dim']} differs from the shared dim {out_dim}; "
                "both sides must map into one space: set model.out_dim instead"
            )
        if full["kind"] == "identity" and feat_dim != out_dim:
            raise ValueError(
                f"model.{side} is identity but its features have D={feat_dim} and the shared dim is {out_dim}; "
                f"set model.out_dim={feat_dim} or give the {side} side an adapter"
            )
        # a setting given for these widths that they leave unused (mlp's bias when in_dim == out_dim)
        api.check_settings_apply(
            full["kind"], spec, where=f"model.{side}", values=spec, widths=(full["in_dim"], full["out_dim"])
        )
        try:
            configs[side] = api.AdapterConfig(**full)
        except (TypeError, ValueError) as err:  # AdapterConfig names the field, not which side's mapping held it
            raise ValueError(f"model.{side}: {err}") from err
    return configs


class AlignmentModel(nn.Module):
    """Image and text adapters mapping frozen features into one shared space."""

    def __init__(self, image_adapter: nn.Module, text_adapter: nn.Module) -> None:
        super().__init__()
        self.image_adapter = image_adapter
        self.text_adapter = text_adapter

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        text_tokens: Tensor | None = None,
        text_token_mask: Tensor | None = None,
        image_token_feats: Tensor | None = None,
        text_token_feats: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Map features into the shared space.

        Args:
            image: (N, D_img) pooled image features.
            text: (M, D_txt) pooled text features.
            text_tokens: optional (M, L, D_txt) tokens of the same texts, conditioning the text adapter.
            text_token_mask: optional (M, L) bool.
            image_token_feats: optional (B, V, D_img) image tokens mapped token by token (token-level CS).
            text_token_feats: optional (B, L, D_txt) text tokens mapped token by token.

        Returns:
            {"image": (N, D), "text": (M, D)} plus "image_tokens" (B, V, D) / "text_tokens" (B, L, D).
        """
        out = {
            "image": self.image_adapter(image),
            "text": self.text_adapter(text, text_tokens=text_tokens, text_token_mask=text_token_mask),
        }
        if image_token_feats is not None:
            out["image_tokens"] = tokenwise(self.image_adapter, image_token_feats)
        if text_token_feats is not None:
            out["text_tokens"] = tokenwise(self.text_adapter, text_token_feats)
        return out


def tokenwise(adapter: nn.Module, tokens: Tensor) -> Tensor:
    """(B, T, D_in) -> (B, T, D_out): the adapter applied to every token on its own."""
    b, t, d = tokens.shape
    return adapter(tokens.reshape(b * t, d)).reshape(b, t, -1)


def build_model(config: ModelConfig, image_dim: int, text_dim: int) -> tuple[AlignmentModel, dict[str, Any]]:
    """Build both adapters (seed torch first for a reproducible init); returns the model and AdapterConfigs."""
    api = _adapter_api()
    configs = adapter_configs(config, image_dim, text_dim)
    model = AlignmentModel(api.build_adapter(configs["image"]), api.build_adapter(configs["text"]))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("neither adapter has trainable parameters; give one side a kind with weights (mlp, prior)")
    return model, configs


def save_adapters(model: AlignmentModel, configs: dict[str, Any], run_dir: str, prefix: str = "") -> dict[str, str]:
    """Write image_adapter.safetensors and text_adapter.safetensors (each atomically); return their paths."""
    import os

    api = _adapter_api()
    paths = {}
    for side in ("image", "text"):
        path = os.path.join(run_dir, f"{prefix}{side}_adapter.safetensors")
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            api.save_adapter(getattr(model, f"{side}_adapter"), configs[side], tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths[side] = path
    return paths


@dataclass
class LoadedAdapters:
    """Trained adapters read back from a run directory."""

    image: nn.Module
    text: nn.Module
    configs: dict[str, Any]
    uses_tokens: bool


def load_adapters(run_dir: str, device: str | torch.device = "cpu") -> LoadedAdapters:
    """Read a run's final adapters (and whether it fed text tokens to the text adapter)."""
    import os

    from csaligner.train.overrides import read_yaml

    api = _adapter_api()
    for side in ("image", "text"):
        if not os.path.isfile(os.path.join(run_dir, f"{side}_adapter.safetensors")):
            raise FileNotFoundError(f"{run_dir} has no {side}_adapter.safetensors; is it a finished training run?")
    image, image_cfg = api.load_adapter(os.path.join(run_dir, "image_adapter.safetensors"))
    text, text_cfg = api.load_adapter(os.path.join(run_dir, "text_adapter.safetensors"))
    uses_tokens = False
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        data = read_yaml(cfg_path).get("data")
        uses_tokens = bool(data.get("use_tokens", False)) if isinstance(data, dict) else False
    configs = {"image": image_cfg, "text": text_cfg}
    return LoadedAdapters(image.to(device).eval(), text.to(device).eval(), configs, uses_tokens)


ENCODERS_FILE = "encoders.json"
"""A run's record of the frozen encoders its features came from: {"image_encoder": id, "text_encoder": id},
and where known how to load them again: {"image_encoder_spec": "efficientnet-lite0", "text_encoder_spec": ...}."""
_RECORDED = ("image_encoder", "text_encoder", "image_encoder_spec", "text_encoder_spec")


def write_run_encoders(run_dir: str, meta: dict[str, object]) -> None:
    """Record the encoder ids of the training features (their `meta`) in the run, where known."""
    import json
    import os

    ids = {k: str(meta[k]) for k in _RECORDED if meta.get(k)}
    path = os.path.join(run_dir, ENCODERS_FILE)
    if ids:
        with open(path, "w") as f:
            json.dump(ids, f, indent=1)
    elif os.path.exists(path):  # an earlier run's record in this folder would be wrong for this one
        os.remove(path)


def run_encoders(run_dir: str) -> dict[str, str]:
    """The encoder ids a run recorded ({} for a run trained on features without provenance)."""
    import json
    import os

    path = os.path.join(run_dir, ENCODERS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            ids = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); delete it to skip the encoder check") from err
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def encoder_mismatches(run_dir: str, meta: dict[str, object]) -> list[tuple[str, str, str]]:
    """(key, recorded id, given id) for each encoder ("image_encoder", "text_encoder") whose id the run
    recorded and `meta` gives, and they differ. Either side unknown is no mismatch."""
    trained = run_encoders(run_dir)
    keys = ("image_encoder", "text_encoder")
    return [(k, trained[k], str(meta[k])) for k in keys if k in trained and meta.get(k) and str(meta[k]) != trained[k]]
