"""`train(run_config) -> RunResult`: the training loop over cached features.

The loop itself is short; setup, logging, checkpointing and the final write-out are helpers, and resuming
from a checkpoint is `csaligner.train.resume`.
Run layout (`train.out_dir`):
    config.yaml                         the resolved config
    metrics.csv                         one row per logged step
    tb/                                 TensorBoard scalars (when tensorboard is installed)
    checkpoints/step-XXXXXXXX/, latest  resumable checkpoints (see checkpoint.py)
    image_adapter.safetensors           final adapters (the EMA weights when train.ema > 0)
    text_adapter.safetensors
    summary.json                        final step, metrics, adapter and checkpoint paths
    encoders.json                       the frozen encoders the features came from (see run_dir.py)
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from csaligner.data.features import PairedFeatures
from csaligner.losses.objective import SETTING_USERS, AlignmentLoss, build_objective
from csaligner.train.batches import BatchSampler, describe_split, split_features
from csaligner.train.checkpoint import rng_state, save_checkpoint
from csaligner.train.config import RunConfig
from csaligner.train.distributed import DistInfo, all_reduce_mean, cleanup, init_distributed, wrap_ddp
from csaligner.train.model import AlignmentModel, build_model, save_adapters, write_run_encoders
from csaligner.train.monitor import RunMonitor, collapsed_embeddings
from csaligner.train.overrides import dump_yaml, to_dict
from csaligner.train.resume import maybe_resume
from csaligner.train.run_dir import check_resume_encoders, claim_out_dir, delete_paths, encoder_ids, summary_metrics
from csaligner.train.schedule import WeightEMA, lr_at
from csaligner.train.step import DeviceFeatures, build_optimizer, compute_terms, optimizer_step, update_ema
from csaligner.train.stored_config import RUN_CONFIG_HEADER


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        run_dir: the run directory.
        step: optimiser steps done.
        total_steps: steps the schedule plans.
        finished: True when step == total_steps and the final adapters were written.
        image_adapter / text_adapter: paths of the final adapters (None when not finished).
        checkpoint: the last checkpoint directory written.
        metrics: the last logged row (step, epoch, lr, loss terms, samples_per_s, ...).
        history: every row logged by this call, in order.
        data: one line counting the pairs, the unpaired pools and what was left out (and why).
    """

    run_dir: str
    step: int
    total_steps: int
    finished: bool
    image_adapter: str | None = None
    text_adapter: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    data: str = ""


@dataclass
class _Run:
    """Everything the loop touches, built once by `_setup`."""

    config: RunConfig
    info: DistInfo
    model: AlignmentModel
    ddp_model: torch.nn.Module
    objective: AlignmentLoss
    optimizer: torch.optim.AdamW
    params: list[torch.nn.Parameter]
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    sampler: BatchSampler
    feats: DeviceFeatures
    adapter_configs: dict[str, Any]
    total_steps: int
    data: str = ""
    data_id: dict[str, str] = field(default_factory=dict)
    """Which data the features came from ({"source", "manifest"} where the caches record them): a resume must match."""
    monitor: RunMonitor | None = None
    step: int = 0
    checkpoint: str | None = None


def train(
    config: RunConfig,
    features: PairedFeatures | None = None,
    *,
    until_step: int | None = None,
    report: Callable[[str], object] | None = None,
) -> RunResult:
    """Train adapters as `config` says; under torchrun, every process calls this.

    Args:
        config: the run (data, model, loss, train sections).
        features: in-memory features to train on instead of loading data.image_cache / data.text_cache.
        until_step: stop after this many total steps (checkpointing there) as if interrupted; resume
            with train.resume="auto". None runs to the end.
        report: called (on the main process) with the data counts line before the first step,
            e.g. `print`; `RunResult.data` holds the same line.

    Returns:
        A `RunResult` with the run directory, final adapter paths and metrics.
    """
    info = init_distributed(config.train.device)
    try:
        return _train(config, features, until_step, info, report)
    finally:
        cleanup(info)


def _train(
    config: RunConfig,
    features: PairedFeatures | None,
    until_step: int | None,
    info: DistInfo,
    report: Callable[[str], object] | None,
) -> RunResult:
    _check_loss_device(config, info.device)
    stale = claim_out_dir(config.train)  # checked first; deleted only once features load and the model builds
    run = _setup(config, features or load_features(config), info, stale)
    if report is not None and info.is_main:
        report(run.data)
    cfg = config.train
    stop = run.total_steps if until_step is None else min(until_step, run.total_steps)
    run.monitor = RunMonitor(
        cfg.out_dir,
        run.total_steps,
        run.step,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
        advice=f"Lower train.lr (now {cfg.lr:g}) and train again; these adapters are not worth evaluating",
    )
    clock = (run.step, time.perf_counter())
    try:
        for step in range(run.step, stop):
            try:
                terms = compute_terms(run.ddp_model, run.objective, run.feats, run.sampler.batch(step), info, config)
            except FloatingPointError as err:  # diverged adapters (see step._diverged): say when
                raise FloatingPointError(f"step {step + 1} of {run.total_steps}: {err}") from err
            lr = lr_at(step, run.total_steps, cfg)
            grad_norm = optimizer_step(run.params, run.optimizer, run.scaler, terms["loss"], lr, cfg)
            update_ema(run.ema, run.model)
            run.step = step + 1
            run.monitor.advance()
            if run.step % cfg.log_every == 0 or run.step == stop:
                clock = _log(run, terms, lr, grad_norm, clock)
            if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                _save(run)
        return _finish(run)
    finally:
        run.monitor.close()


def _check_loss_device(config: RunConfig, device: torch.device) -> None:
    """loss.impl=triton off CUDA fails at the first step, in the loss's own words (impl='chunked'):
    refuse it before anything loads, naming the flags."""
    if config.loss.impl == "triton" and device.type != "cuda":
        raise ValueError(
            f"loss.impl=triton needs a CUDA device, but this run trains on {device}; use --loss.impl=auto "
            "(Triton on CUDA, the chunked path elsewhere) or --loss.impl=chunked"
        )


def load_features(config: RunConfig) -> PairedFeatures:
    """Read data.image_cache / data.text_cache with csaligner.data.load_paired_features."""
    from csaligner.data import load_paired_features

    for path in (config.data.image_cache, config.data.text_cache):
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"feature cache {path!r} does not exist; make it with `csalign encode` "
                "or point data.image_cache / data.text_cache at it"
            )
    feats: PairedFeatures = load_paired_features(config.data.image_cache, config.data.text_cache)
    return feats


def _setup(config: RunConfig, features: PairedFeatures, info: DistInfo, stale: list[str]) -> _Run:
    cfg = config.train
    pools = config.loss.takes_unpaired  # infonce / l2_prior have no term for unpaired data
    split = split_features(features, config.data, pools=pools)
    why = "data.use_unpaired=false" if pools else f"loss.objective={config.loss.objective} has no divergence term"
    sampler = BatchSampler(split, config.data, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    _refuse_single_pair_batches(config, sampler.batch_size, split.num_paired)
    total = cfg.steps or cfg.epochs * sampler.steps_per_epoch
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    model, adapter_configs = build_model(config.model, features.image.shape[1], features.text.shape[1])
    model.to(info.device)
    objective = build_objective(config.loss).to(info.device)
    optimizer, params = build_optimizer([model, objective], cfg)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    feats = DeviceFeatures.from_features(features, info.device, config.data.use_tokens, config.loss.token_lam > 0)
    run = _Run(
        config, info, model, model, objective, optimizer, params, scaler, ema, sampler, feats, adapter_configs, total
    )
    run.data = describe_split(split, features, why)
    run.data_id = {k: str(features.meta[k]) for k in ("source", "manifest") if features.meta.get(k)}
    maybe_resume(run)
    if run.checkpoint is not None:  # the record of the run that wrote it (train.resume may name another folder's)
        check_resume_encoders(os.path.dirname(os.path.dirname(run.checkpoint)), features.meta)
    run.ddp_model = wrap_ddp(model, info)
    if info.is_main:
        delete_paths(stale)  # train.overwrite: the previous run goes only now that this one is set up
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            header = (  # out_dir holds this run now, so a fresh run needs another folder (or train.overwrite)
                f"{RUN_CONFIG_HEADER}; train it again: csalign train --config {cfg.out_dir}/config.yaml "
                f"--train.out_dir={str(cfg.out_dir).rstrip('/')}-2"
            )
            f.write(dump_yaml(config, header=header))
        if run.checkpoint is None or encoder_ids(features.meta):  # a resume on unlabelled features keeps the record
            write_run_encoders(cfg.out_dir, features.meta)  # eval checks its features came from the same encoders
    return run


def _refuse_single_pair_batches(config: RunConfig, batch_size: int, num_paired: int) -> None:
    """InfoNCE over one pair has no negative: its loss is exactly 0 and the run would train nothing on it."""
    if batch_size >= 2 or config.loss.objective not in SETTING_USERS["temperature"][0]:  # l2_prior has no InfoNCE
        return
    why = (
        f"train.batch_size={config.train.batch_size}"
        if config.train.batch_size < 2
        else f"only {num_paired} paired image (data.paired_fraction={config.data.paired_fraction})"
    )
    raise ValueError(
        f"{why} gives InfoNCE one pair a step and no negatives, so loss.objective={config.loss.objective} would "
        "train on an InfoNCE term that is always 0; raise train.batch_size (or data.paired_fraction) to at least "
        "2 pairs a step"
    )


def _log(
    run: _Run, terms: dict[str, Tensor], lr: float, grad_norm: Tensor | None, clock: tuple[int, float]
) -> tuple[int, float]:
    values = {k: float(v.detach()) for k, v in terms.items()}
    if not all(map(_finite, values.values())):
        raise FloatingPointError(f"non-finite loss at step {run.step}: {values}; lower train.lr or check the data")
    values = all_reduce_mean(values, run.info)
    now = time.perf_counter()
    images = (run.step - clock[0]) * run.sampler.batch_size
    row: dict[str, float] = {
        "step": run.step,
        "epoch": run.sampler.epochs_done(run.step),
        "lr": lr,
        **values,
        "samples_per_s": images / max(now - clock[1], 1e-9),
    }
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    if run.objective.config.learn_temperature:
        row["temperature"] = float(run.objective.temperature.detach())
    assert run.monitor is not None
    run.monitor.log(row)
    return run.step, now


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _training_state(run: _Run) -> dict[str, Any]:
    return {
        "step": run.step,
        "epoch": run.sampler.epochs_done(run.step),
        "total_steps": run.total_steps,
        "schedule": {"kind": run.config.train.schedule, "lr": run.config.train.lr},
        "rng": rng_state(),
        "scaler": run.scaler.state_dict(),
        "ema_updates": run.ema.updates if run.ema else 0,
        "config": to_dict(run.config),
        "data": run.data_id,
    }


def _save(run: _Run) -> None:
    if not run.info.is_main:
        return
    tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    tensors.update({f"objective.{k}": v for k, v in run.objective.state_dict().items()})
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.shadow.items()})
    root = os.path.join(run.config.train.out_dir, "checkpoints")
    run.checkpoint = save_checkpoint(
        root,
        run.step,
        tensors,
        run.optimizer.state_dict(),
        _training_state(run),
        keep=run.config.train.keep_checkpoints,
    )


@torch.no_grad()
def _sample_outputs(model: AlignmentModel, feats: DeviceFeatures, rows: int = 1024) -> dict[str, Tensor]:
    """The final adapters' outputs for the first `rows` training images and texts: one forward, once.

    `model` (the CPU copy just saved) is moved to the features' device, the run's: on the CPU a prior adapter
    over 1,024 texts x 77 tokens took 39 s (2 cores) after the GPU had finished. In eval mode, as it is used."""
    n, m = min(rows, feats.image.shape[0]), min(rows, feats.text.shape[0])
    model = model.to(feats.image.device).eval()

    def first(t: Tensor | None, k: int) -> Tensor | None:
        return None if t is None else t[:k]

    out = model(
        image=feats.image[:n],
        text=feats.text[:m],
        text_tokens=first(feats.text_tokens, m),
        text_token_mask=first(feats.text_token_mask, m),
    )
    return {"image": out["image"], "text": out["text"]}


def _finish(run: _Run) -> RunResult:
    cfg = run.config.train
    assert run.monitor is not None
    history = run.monitor.history
    result = RunResult(
        cfg.out_dir,
        run.step,
        run.total_steps,
        run.step >= run.total_steps,
        metrics=history[-1] if history else summary_metrics(cfg.out_dir) if run.info.is_main else {},
        history=history,
        data=run.data,
    )
    if run.info.is_main and (run.checkpoint is None or not run.checkpoint.endswith(f"step-{run.step:08d}")):
        _save(run)
    result.checkpoint = run.checkpoint
    if result.finished and run.info.is_main:
        final = copy.deepcopy(run.model).cpu()
        if run.ema is not None:
            run.ema.copy_to(final)
        paths = save_adapters(final, run.adapter_configs, cfg.out_dir)
        if not run.monitor.degenerate and (why := collapsed_embeddings(_sample_outputs(final, run.feats))):
            run.monitor.warn_degenerate(why)
        result.image_adapter, result.text_adapter = paths["image"], paths["text"]
        summary = {
            "step": run.step,
            "total_steps": run.total_steps,
            "metrics": result.metrics,
            "image_adapter": paths["image"],
            "text_adapter": paths["text"],
            "checkpoint": run.checkpoint,
            "data": run.data_id,  # eval says so when it is handed these very features as held-out data
        }
        if run.monitor.degenerate:
            summary["warnings"] = run.monitor.degenerate
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return result
