"""Config dataclasses for a training run: one frozen dataclass per YAML section.

```yaml
data:  {image_cache: cache/flickr8k-train-efficientnet-lite0, text_cache: cache/flickr8k-train-minilm}
model: {image: {kind: mlp}, text: {kind: mlp}, out_dim: 512}
loss:  {objective: cs_aligner, lam: 0.01, sigma: 1.0}
train: {epochs: 10, batch_size: 1024, lr: 5.0e-5}
```

`RunConfig` groups them; `csaligner.train.overrides` loads YAML and `--train.lr=1e-4` flags onto it. Settings
the run would ignore are refused; `csaligner.train.stored_config` reads back configs that earlier versions
stored with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from csaligner._validation import is_integer, is_number, numpy_hint
from csaligner.losses.objective import DIVERGENCE_TERMS, LossConfig

ADAPTER_KINDS = ("prior", "mlp", "linear", "identity")
"""The built-in adapter kinds; a kind added with `@register_adapter` is accepted as well (`adapter_kinds`)."""


def adapter_kinds() -> list[str]:
    """Every registered adapter kind: the built-ins and those added with `@register_adapter`."""
    from csaligner.adapters.registry import ADAPTERS

    return sorted(ADAPTERS)


CaptionMode = Literal["one", "all"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DataConfig:
    """Which cached features to train on and how to split them into paired and unpaired data."""

    image_cache: str = "cache/flickr8k-train-efficientnet-lite0"
    """Image feature cache directory (made by `csalign encode`), relative to the working directory."""
    text_cache: str = "cache/flickr8k-train-minilm"
    """Text feature cache directory for the same images' captions."""
    paired_fraction: float = 1.0
    """Fraction of images kept as pairs, in (0, 1]. The rest become unpaired pools: their images and
    their captions are shuffled independently (seeded), so no pairing information survives."""
    use_unpaired: bool = True
    """Put the unpaired pools into the CS term (True) or drop them (False: a smaller paired set). An
    objective without a divergence (infonce, l2_prior) has no term for them: with paired_fraction < 1 it
    needs use_unpaired=false (the run says it trains on the pairs alone). Images without a caption and
    texts without an image are left out under such an objective either way (the data line counts them)."""
    unpaired_batch_size: int = 0
    """Unpaired images and unpaired texts drawn per step (without replacement) for the CS term; 0 means
    train.batch_size. Refused with use_unpaired=false (no pools to draw from) and for an objective without a
    divergence (infonce, l2_prior)."""
    captions_per_image: CaptionMode = "one"
    """Captions per image in InfoNCE: "one" (a random caption each step, plain pairs) or "all"
    (every caption, multi-positive InfoNCE)."""
    captions_per_image_in_cs: CaptionMode = "one"
    """Captions per image in the CS term: "one" or "all". With captions_per_image "one" and this "all",
    the image's other captions enter only the CS term (as unpaired texts), so an objective without a
    divergence (infonce, l2_prior) refuses that combination."""
    use_tokens: bool = False
    """Load token features: the text adapter receives text tokens (the prior kind attends to them) and
    loss.token_lam > 0 adds the token-level CS term on token-wise adapted tokens. Refused where neither reads
    them (loss.token_lam 0 and a text adapter that ignores tokens: mlp, linear, identity)."""
    token_images: int = 0
    """Images per global batch whose token sets enter the token-level CS term; 0 means every image of
    the batch. The term is a mean of per-image divergences, so a random subset (the batch order is
    already random) is an unbiased estimate at a fraction of the cost: (B, 49, 1280) vision tokens a
    step dominate a CPU step, where 64 images carry most of the signal. Refused with loss.token_lam 0 (no term)."""
    split_seed: int = 0
    """Seed of the paired / unpaired split and the pools' shuffles (independent of train.seed)."""

    def __post_init__(self) -> None:
        for name in ("image_cache", "text_cache"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name} must be a non-empty path, got {getattr(self, name)!r}")
        if not (is_number(self.paired_fraction) and 0 < self.paired_fraction <= 1):
            raise ValueError(f"data.paired_fraction must lie in (0, 1], got {self.paired_fraction!r}")
        if not is_integer(self.unpaired_batch_size, plain=True) or self.unpaired_batch_size < 0:
            raise ValueError(
                f"data.unpaired_batch_size must be an integer >= 0 (0 = train.batch_size), "
                f"got {self.unpaired_batch_size!r}{numpy_hint(self.unpaired_batch_size)}"
            )
        if not is_integer(self.token_images, plain=True) or self.token_images < 0:
            raise ValueError(
                f"data.token_images must be an integer >= 0 (0 = the whole batch), got {self.token_images!r}"
                + numpy_hint(self.token_images)
            )
        if not is_integer(self.split_seed, plain=True):
            raise ValueError(
                f"data.split_seed must be an integer, got {self.split_seed!r}{numpy_hint(self.split_seed)}"
            )
        for name in ("captions_per_image", "captions_per_image_in_cs"):
            if getattr(self, name) not in ("one", "all"):
                raise ValueError(f'data.{name} must be "one" or "all", got {getattr(self, name)!r}')
        if self.captions_per_image == "all" and self.captions_per_image_in_cs == "one":
            raise ValueError(
                'data.captions_per_image="all" with captions_per_image_in_cs="one" is not possible: the CS '
                "term sees every text InfoNCE sees. Use captions_per_image=one with captions_per_image_in_cs=all "
                "(extra captions only in CS), or all/all"
            )


DATA_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(DataConfig)}
"""Every `DataConfig` field's default value."""


@dataclass(frozen=True)
class ModelConfig:
    """Which side(s) get a trainable adapter, and the shared space they map into."""

    image: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp"})
    """Image adapter: AdapterConfig fields as a mapping, e.g. {kind: mlp, mlp_ratio: 4}. kind is one of
    prior, mlp, linear, identity (identity = the frozen features as they are). in_dim/out_dim may be left
    out (or 0): they are inferred from the features and `out_dim`. The mapping holds only the fields given
    (the rest take AdapterConfig's defaults), and a field the kind does not use (mlp_ratio for linear) is
    refused."""
    text: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp"})
    """Text adapter, same form as `image`."""
    out_dim: int = 0
    """Shared output dim of both adapters. 0 infers it: the feature dim of the identity side if there is
    one (text-to-image prior: the image dim), else the image feature dim."""

    def __post_init__(self) -> None:
        for side in ("image", "text"):
            spec = getattr(self, side)
            if not isinstance(spec, dict):
                raise ValueError(f"model.{side} must be a mapping like {{kind: mlp}}, got {spec!r}")
            if spec.get("kind") not in adapter_kinds():
                raise ValueError(
                    f"model.{side}.kind must be one of {adapter_kinds()}, got {spec.get('kind')!r}; a kind of "
                    "your own must be registered with @register_adapter before the config is built"
                )
            unknown = sorted(set(spec) - _adapter_fields())
            if unknown:
                raise ValueError(f"unknown key model.{side}.{unknown[0]!s}; adapter keys: {sorted(_adapter_fields())}")
            for dim in ("in_dim", "out_dim"):
                if not is_integer(spec.get(dim, 0), plain=True) or spec.get(dim, 0) < 0:
                    raise ValueError(
                        f"model.{side}.{dim} must be an int >= 0 (0 = infer), got {spec[dim]!r}{numpy_hint(spec[dim])}"
                    )
            _check_settings_apply(side, spec)
        if self.image["kind"] == "identity" and self.text["kind"] == "identity":
            raise ValueError(
                "model.image and model.text are both identity: nothing to train; give one side an "
                "adapter kind (prior, mlp, linear)"
            )
        if not is_integer(self.out_dim, plain=True) or self.out_dim < 0:
            raise ValueError(
                f"model.out_dim must be an int >= 0 (0 = infer), got {self.out_dim!r}{numpy_hint(self.out_dim)}"
            )


def _adapter_fields() -> set[str]:
    """The keys a model.image / model.text mapping may hold: `AdapterConfig`'s fields."""
    from csaligner.adapters.config import AdapterConfig

    return {f.name for f in fields(AdapterConfig)}


def _check_settings_apply(side: str, spec: dict[str, Any]) -> None:
    """Refuse a given adapter setting its kind ignores. `spec` holds only what YAML or flags gave (plus the
    kind), so AdapterConfig's defaults never trip this; a saved adapter's full config is not checked here."""
    from csaligner.adapters import check_settings_apply

    try:
        check_settings_apply(spec["kind"], spec, where=f"model.{side}", values=spec)
    except ValueError as err:
        raise ValueError(
            f"{err}. A --model.{side}.kind flag keeps the config's other model.{side} keys; to replace them "
            f"all, give the whole mapping: --model.{side}='{{kind: {spec['kind']}}}'"
        ) from None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, precision and bookkeeping of the training loop."""

    epochs: int = 10
    """Passes over the paired images (ignored when steps > 0)."""
    steps: int = 0
    """Total optimiser steps; 0 means epochs * steps_per_epoch."""
    batch_size: int = 1024
    """Global number of paired images per step, summed over all processes (the paper: 1024)."""
    lr: float = 5e-5
    """Peak AdamW learning rate (the paper: 5e-5; small adapters on small data often want more)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps; when 0, warmup_fraction of the total steps is used."""
    warmup_fraction: float = 0.05
    """Warmup length as a fraction of total steps (used when warmup_steps is 0)."""
    min_lr_ratio: float = 0.0
    """Cosine decay floor as a fraction of lr."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    seed: int = 0
    """Seed of initialisation, batch order and caption choice."""
    ema: float = 0.0
    """EMA decay of adapter weights (e.g. 0.999); 0 disables EMA. The saved adapters are the EMA weights."""
    precision: Precision = "fp32"
    """Adapter compute precision: "fp32", or autocast to "bf16" / "fp16" (fp16 with a gradient scaler)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Under torchrun each process uses its local GPU."""
    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.csv, checkpoints/, the final adapters."""
    log_every: int = 10
    """Write metrics (CSV, TensorBoard, progress bar) every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep: the one just written and the newest before it (0 keeps all)."""
    resume: str = ""
    """"" (start fresh), "auto" (the latest checkpoint in out_dir if any) or a checkpoint directory. A fresh
    run refuses an out_dir that already holds a run's checkpoints or summary.json (see overwrite)."""
    overwrite: bool = False
    """Let a fresh run (resume "") replace the run already in out_dir: its checkpoints/, summary.json, final
    adapters, metrics.csv, tb/, encoders.json and the eval/ folder of `csalign eval` are deleted once the new
    run's features and model are ready; other files there are left alone."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    tensorboard: bool = True
    """Also log to TensorBoard under out_dir/tb when the tensorboard package is installed."""

    def __post_init__(self) -> None:
        for name in ("epochs", "steps", "warmup_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not is_integer(value, plain=True) or value < 0:
                raise ValueError(f"train.{name} must be an int >= 0, got {value!r}{numpy_hint(value)}")
        if self.epochs == 0 and self.steps == 0:
            raise ValueError("train.epochs and train.steps are both 0: set one of them > 0")
        if not is_integer(self.batch_size, plain=True) or self.batch_size < 1:
            raise ValueError(
                f"train.batch_size must be an integer >= 1, got {self.batch_size!r}{numpy_hint(self.batch_size)}"
            )
        if not is_integer(self.seed, plain=True):
            raise ValueError(f"train.seed must be an integer, got {self.seed!r}{numpy_hint(self.seed)}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("warmup_fraction", "min_lr_ratio"):
            if not (is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                raise ValueError(f"train.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if not (is_number(self.ema) and 0 <= self.ema < 1):
            raise ValueError(f"train.ema must lie in [0, 1) (e.g. 0.999; 0 disables EMA), got {self.ema!r}")
        if len(self.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f'train.precision must be "fp32", "bf16" or "fp16", got {self.precision!r}')
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f'train.schedule must be "cosine" or "constant", got {self.schedule!r}')
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f'train.device must be "auto", "cpu", "cuda" or "cuda:N", got {self.device!r}')
        if not self.out_dir:
            raise ValueError("train.out_dir must be a non-empty path")
        if self.overwrite and self.resume:
            raise ValueError(
                f"train.overwrite=true deletes the run in out_dir, train.resume={self.resume!r} continues one: "
                "set only one of them"
            )


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: the four YAML sections."""

    data: DataConfig = field(default_factory=DataConfig)
    """Feature caches and the paired/unpaired/caption variants."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Adapters on each side and the shared dim."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective (csaligner.losses.LossConfig)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and bookkeeping."""

    def __post_init__(self) -> None:
        if self.loss.token_lam > 0 and not self.data.use_tokens:
            raise ValueError(
                f"loss.token_lam={self.loss.token_lam} needs token features: set data.use_tokens=true "
                "(or loss.token_lam=0)"
            )
        from csaligner.train.stored_config import (  # imports this
            ignored_data_settings,
            ignored_token_settings,
            ignored_unpaired_settings,
        )

        # e.g. infonce with unpaired pools: the saved config would describe data the run never used
        data = ignored_data_settings(self.data.__dict__, self.loss.objective)
        pools_off = ignored_unpaired_settings(self.data.__dict__).keys() - data.keys()  # the objective's reason first
        tokens = ignored_token_settings(self.data.__dict__, self.loss.token_lam, self.model.text["kind"])
        messages = [_ignored_data_message(self.data, self.loss.objective, name) for name in data]
        messages += [_pools_off_message(self.data)] if pools_off else []
        messages += [_ignored_token_message(self, name) for name in tokens]
        if messages:
            raise ValueError("; ".join(messages))


def _ignored_data_message(data: DataConfig, objective: str, name: str) -> str:
    """Why data.<name> does nothing under `objective` (one without a divergence term), and what to do."""
    *others, last = (repr(o) for o in DIVERGENCE_TERMS)
    divergences = f"{', '.join(others)} or {last}"
    lacks = f"objective {objective!r} has no divergence term, the only term they enter"
    if name == "use_unpaired":
        return (
            f"data.paired_fraction={data.paired_fraction!r} with data.use_unpaired=true would put the other images "
            f"and their captions into unpaired pools, but {lacks}, so they would be dropped; set "
            f"data.use_unpaired=false to train on the pairs alone (what {objective!r} does), or use objective "
            f"{divergences} to train on the pools too"
        )
    if name == "unpaired_batch_size":
        pools = "" if data.use_unpaired else " with data.use_unpaired=true (false drops the pools it draws from)"
        return (
            f"data.unpaired_batch_size={data.unpaired_batch_size!r} sizes a step's draw of unpaired data, but {lacks}, "
            f"so it would be ignored; drop it (or set it back to its default, 0) or use objective {divergences}{pools}"
        )
    return (
        f'data.captions_per_image_in_cs="all" with captions_per_image="one" puts each image\'s other captions '
        f"into the divergence term alone, but {lacks}, so they would be ignored; drop it (or set it back to its "
        f'default, "one"), set data.captions_per_image="all" to train on every caption, or use objective '
        f"{divergences}"
    )


def _pools_off_message(data: DataConfig) -> str:
    """Why data.unpaired_batch_size does nothing with data.use_unpaired=false, and what to do."""
    return (
        f"data.unpaired_batch_size={data.unpaired_batch_size!r} sizes a step's draw of unpaired data, but "
        "data.use_unpaired=false drops the unpaired pools, so it would be ignored; drop it (or set it back to its "
        "default, 0), or set data.use_unpaired=true to train on the pools"
    )


def _ignored_token_message(config: RunConfig, name: str) -> str:
    """Why data.<name> (use_tokens, token_images) does nothing with loss.token_lam=0, and what to do."""
    from csaligner.train.stored_config import token_readers

    off = f"loss.token_lam={config.loss.token_lam!r} turns off the token-level CS term"
    if name == "token_images":
        return (
            f"data.token_images={config.data.token_images!r} picks the images of the token-level CS term, but {off}, "
            "so it would be ignored; drop it (or set it back to its default, 0), or train the term with "
            "loss.token_lam > 0 and data.use_tokens=true"
        )
    kind = config.model.text["kind"]
    readers = " or ".join(repr(k) for k in token_readers())
    return (
        f"data.use_tokens=true loads token features for the token-level CS term and for a text adapter that reads "
        f"them, but {off} and model.text.kind={kind!r} ignores text tokens, so they would be ignored; set "
        f"data.use_tokens=false, train the term with loss.token_lam > 0, or give the text side a kind that reads "
        f"tokens ({readers})"
    )
