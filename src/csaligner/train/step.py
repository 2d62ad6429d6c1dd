"""One optimisation step: map a batch through the adapters, gather globally, score, update."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csaligner._validation import NonFiniteFeaturesError
from csaligner.data.features import PairedFeatures
from csaligner.train.batches import Batch
from csaligner.train.config import RunConfig, TrainConfig
from csaligner.train.distributed import DistInfo, all_gather_no_grad, all_gather_with_grad
from csaligner.train.schedule import WeightEMA

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DeviceFeatures:
    """The frozen features on the training device, indexed by the sampler's row ids."""

    image: Tensor
    text: Tensor
    image_tokens: Tensor | None = None
    image_token_mask: Tensor | None = None
    text_tokens: Tensor | None = None
    text_token_mask: Tensor | None = None

    @classmethod
    def from_features(
        cls, f: PairedFeatures, device: torch.device, use_tokens: bool, token_cs: bool = False
    ) -> DeviceFeatures:
        """Move what the run uses: text tokens when use_tokens, image tokens only for the token-level CS term."""

        def move(t: Tensor | None, wanted: bool) -> Tensor | None:
            return None if t is None or not wanted else t.to(device)

        if use_tokens and f.text_tokens is None:
            raise ValueError(
                "data.use_tokens=true but the text cache (data.text_cache) has no token features; re-encode it "
                "with `csalign encode --tokens ...`, or set data.use_tokens=false"
            )
        if token_cs and f.image_tokens is None:
            raise ValueError(
                "loss.token_lam > 0 needs image token features, but the image cache (data.image_cache) has none; "
                "re-encode it with `csalign encode --tokens ...`, or set loss.token_lam=0"
            )
        return cls(
            f.image.to(device).float(),
            f.text.to(device).float(),
            move(f.image_tokens, token_cs),
            move(f.image_token_mask, token_cs),
            move(f.text_tokens, use_tokens),
            move(f.text_token_mask, use_tokens),
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Autocast to bf16/fp16 for "bf16"/"fp16"; a no-op for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[precision])


def _rows(t: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if t is None else t[rows.to(t.device)]


def model_inputs(feats: DeviceFeatures, batch: Batch, config: RunConfig) -> dict[str, Tensor | None]:
    """Gather the rows a step needs: paired + unpaired images, InfoNCE + CS-only texts, tokens.

    The unpaired images and CS-only texts are left out for an objective without a divergence
    (infonce, l2_prior): it has no term they could enter, and the adapters need not map them.
    """
    pools = config.loss.takes_unpaired
    image_rows = torch.cat([batch.image_rows, batch.unpaired_image_rows]) if pools else batch.image_rows
    text_rows = torch.cat([batch.text_rows, batch.cs_text_rows]) if pools else batch.text_rows
    with_token_cs = config.loss.token_lam > 0
    return {
        "image": _rows(feats.image, image_rows),
        "text": _rows(feats.text, text_rows),
        "text_tokens": _rows(feats.text_tokens, text_rows),
        "text_token_mask": _rows(feats.text_token_mask, text_rows),
        "image_token_feats": _rows(feats.image_tokens, batch.token_image_rows) if with_token_cs else None,
        "text_token_feats": _rows(feats.text_tokens, batch.token_text_rows) if with_token_cs else None,
    }


def compute_terms(
    model: nn.Module, objective: nn.Module, feats: DeviceFeatures, batch: Batch, info: DistInfo, config: RunConfig
) -> dict[str, Tensor]:
    """Forward one process's share, all-gather to the global batch, and return the objective's terms.

    Every process returns the same global terms, computing its share of the rows of InfoNCE's and
    D_CS's Gram matrices; `loss.backward()` then yields (after DDP's gradient averaging) the
    gradient of one process on the concatenated batch.
    """
    batch = batch.to(feats.image.device)
    with autocast(info.device, config.train.precision):
        out = model(**model_inputs(feats, batch, config))
    n_img, n_txt = batch.image_rows.numel(), batch.text_rows.numel()
    gather = all_gather_with_grad
    kwargs: dict[str, Tensor | None] = {
        "text_to_image": all_gather_no_grad(batch.text_to_image.to(info.device) + _rank_offset(n_img, info))
        if config.data.captions_per_image == "all"
        else None,
        "unpaired_images": _nonempty(gather(out["image"][n_img:])),
        "unpaired_texts": _nonempty(gather(out["text"][n_txt:])),
    }
    if "image_tokens" in out:
        kwargs["image_tokens"] = gather(out["image_tokens"])
        kwargs["text_tokens"] = gather(out["text_tokens"])
        kwargs["image_token_mask"] = _gather_mask(_rows(feats.image_token_mask, batch.token_image_rows))
        kwargs["text_token_mask"] = _gather_mask(_rows(feats.text_token_mask, batch.token_text_rows))
    # shard: each process takes its share of the Gram matrices' rows (csaligner.kernels.sharded).
    try:
        return dict(objective(gather(out["image"][:n_img]), gather(out["text"][:n_txt]), **kwargs, shard=info.enabled))
    except NonFiniteFeaturesError as err:
        raise _diverged(err, config.train) from err


def _diverged(err: NonFiniteFeaturesError, cfg: TrainConfig) -> FloatingPointError:
    """The loss saw NaN/Inf adapter outputs. The frozen features were checked finite when they were
    loaded (`PairedFeatures`), so the adapters diverged: say so, with the settings to change."""
    fixes = [f"lower train.lr (now {cfg.lr:g})"]
    if cfg.grad_clip <= 0:
        fixes.append("clip gradients (train.grad_clip=1.0; now 0, off)")
    if cfg.precision != "fp32":
        fixes.append(f"train in fp32 (train.precision=fp32; now {cfg.precision})")
    return FloatingPointError(
        f"the adapters' {err.name} outputs contain NaN or Inf in {err.n_bad} of {err.total} vectors: training "
        f"diverged (the frozen features were finite when loaded); " + ", or ".join(fixes)
    )


def _rank_offset(n: int, info: DistInfo) -> int:
    """Where this process's images start in the gathered batch. `BatchSampler` gives every process the
    same number of images (train.batch_size must divide by the process count), so no all-gather is needed."""
    return info.rank * n if info.enabled else 0


def _nonempty(t: Tensor) -> Tensor | None:
    return t if t.shape[0] else None


def _gather_mask(mask: Tensor | None) -> Tensor | None:
    # gloo cannot all_gather bool tensors: go through uint8.
    return None if mask is None else all_gather_no_grad(mask.to(torch.uint8)).bool()


def optimizer_step(
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: Tensor,
    lr: float,
    config: TrainConfig,
) -> Tensor | None:
    """Backward, unscale, clip, step. Returns the pre-clip gradient norm (None when clipping is off).

    The norm stays a tensor so the step does not wait for the device; read it only when logging.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    norm = None
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return norm


def build_optimizer(modules: list[nn.Module], config: TrainConfig) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    """AdamW with weight decay on matrices only (biases, norms and the temperature are not decayed)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas), params


def update_ema(ema: WeightEMA | None, model: nn.Module) -> None:
    if ema is not None:
        ema.update(model)
