"""Training objectives: CS-Aligner (InfoNCE + lambda * D_CS) and the baselines it is compared with.

Every objective is an nn.Module with the same call shape,
``loss_fn(image, text, text_to_image=None, unpaired_images=None, ...) -> dict[str, Tensor]``,
returning named terms and the total under ``"loss"`` (open_clip's CLIPTask style). Unpaired
images and texts enter only the distribution divergence, so the objectives without one (infonce,
l2_prior) refuse them instead of ignoring them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner._autocast import autocast_off
from csaligner._validation import (
    check_features,
    check_positive,
    check_same_dim,
    check_tokens,
    checks_finite_once,
    defer_finite_check,
    is_number,
)
from csaligner.losses.contrastive import check_text_to_image, info_nce
from csaligner.losses.divergence import Bandwidth, gaussian_kl, mmd, resolve_bandwidth, token_cs_divergence

ObjectiveName = Literal["cs_aligner", "infonce", "mmd", "kl", "l2_prior"]
Impl = Literal["auto", "dense", "chunked", "triton"]
MIN_LEARNED_TEMPERATURE = 0.01
"""A learned temperature is clamped here (CLIP's logit scale <= 100)."""
DIVERGENCE_TERMS: dict[str, str] = {"cs_aligner": "cs", "mmd": "mmd", "kl": "kl"}
"""Objective -> name of its distribution-divergence term, the only term unpaired data enters."""
SETTING_USERS: dict[str, tuple[tuple[str, ...], str]] = {
    "lam": (("cs_aligner", "mmd", "kl"), "no divergence term"),
    "sigma": (("cs_aligner", "mmd"), "no kernel term and token_lam=0 (no token-level CS term)"),
    "learn_sigma": (("cs_aligner", "mmd"), "no kernel term and token_lam=0 (no token-level CS term)"),
    "temperature": (("cs_aligner", "infonce", "mmd", "kl"), "no InfoNCE term"),
    "learn_temperature": (("cs_aligner", "infonce", "mmd", "kl"), "no InfoNCE term"),
    "impl": (("cs_aligner", "infonce"), "no fused InfoNCE + D_CS path (it computes its terms densely)"),
}
"""`LossConfig` field -> (the objectives that read it, what the others lack). sigma and learn_sigma are read
by every objective when token_lam > 0 (the token-level CS term's kernel); token_lam and normalize always."""


@dataclass(frozen=True)
class LossConfig:
    """Configuration of a training objective (maps one to one onto the `loss:` YAML section)."""

    objective: ObjectiveName = "cs_aligner"
    """Which objective: "cs_aligner" (InfoNCE + lam * D_CS), "infonce" (InfoNCE only), "mmd" / "kl"
    (InfoNCE + lam * Gaussian-kernel MMD / Gaussian KL, the divergence ablation) or "l2_prior"
    (Eclipse's L2 between mapped text and its image embedding). A field the objective ignores (lam for
    infonce, temperature for l2_prior, ...: `SETTING_USERS`) is refused unless it keeps its default."""
    lam: float = 0.01
    """Weight of the distribution divergence (the paper's lambda); infonce and l2_prior have none."""
    sigma: float | Literal["median"] = 1.0
    """Gaussian kernel bandwidth on unit-norm features, or "median": of D_CS (cs_aligner), MMD (mmd) and the
    token-level CS term (token_lam > 0, any objective)."""
    temperature: float = 0.07
    """InfoNCE softmax temperature (initial value when learnable); l2_prior has no InfoNCE term."""
    learn_temperature: bool = False
    """Learn the temperature as CLIP's log logit scale (clamped to temperature >= 0.01, so it must
    start there); a fixed temperature is used as given."""
    learn_sigma: bool = False
    """Learn the kernel bandwidth (as log sigma, starting from `sigma`); needs a numeric sigma."""
    token_lam: float = 0.0
    """Weight of the token-level CS term (needs token features); 0 disables it."""
    normalize: bool = True
    """L2-normalise features before every term, as the paper does."""
    impl: Impl = "auto"
    """Kernel path for InfoNCE + D_CS (cs_aligner, infonce): dense reference, chunked O(N) memory, or Triton
    on CUDA. mmd, kl and l2_prior compute their terms densely."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {sorted(OBJECTIVES)}")
        for name in ("lam", "token_lam"):  # a bool weight (lam=True) is a flag in the wrong place, not 1.0
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.sigma, str):
            if self.sigma != "median":
                raise ValueError(f'sigma must be a positive number or "median", got {self.sigma!r}')
            if self.learn_sigma:
                raise ValueError('learn_sigma needs a numeric starting sigma, got "median"; pass e.g. sigma=1.0')
        else:
            check_positive("sigma", self.sigma)
        check_positive("temperature", self.temperature)
        if self.learn_temperature and self.temperature < MIN_LEARNED_TEMPERATURE:
            # Below the clamp the learned scale gets no gradient and would never move.
            raise ValueError(
                f"learn_temperature clamps the temperature to >= {MIN_LEARNED_TEMPERATURE}, got {self.temperature}; "
                "start at or above it, or keep the temperature fixed (learn_temperature=False)"
            )
        if self.impl not in ("auto", "dense", "chunked", "triton"):
            raise ValueError(f"impl must be auto, dense, chunked or triton, got {self.impl!r}")
        ignored = ignored_settings(self.__dict__)
        if ignored:  # e.g. lam for infonce: the run would be plain InfoNCE under a config that says otherwise
            raise ValueError("; ".join(_ignored_message(self, name) for name in ignored))

    @property
    def takes_unpaired(self) -> bool:
        """True when the objective has a distribution divergence (cs_aligner, mmd, kl): the only term
        unpaired images and texts can enter. infonce and l2_prior refuse them."""
        return self.objective in DIVERGENCE_TERMS


LOSS_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LossConfig)}
"""Every `LossConfig` field's default value."""


def ignored_settings(values: Mapping[str, Any]) -> list[str]:
    """The fields its objective ignores among `values` (a `LossConfig`'s fields by name, as `dataclasses.asdict`
    gives them) that differ from their defaults; [] for an unknown objective. A default is not a setting: the
    dataclass cannot tell `LossConfig(objective="infonce")` from one given lam=0.01."""
    objective = values.get("objective", LOSS_DEFAULTS["objective"])
    if objective not in OBJECTIVES:
        return []
    token_lam = values.get("token_lam", 0.0)
    token_cs = is_number(token_lam) and token_lam > 0  # its kernel takes sigma whatever the objective
    return [
        name
        for name, (users, _) in SETTING_USERS.items()
        if objective not in users
        and not (token_cs and name in ("sigma", "learn_sigma"))
        and name in values
        and values[name] != LOSS_DEFAULTS[name]
    ]


def _ignored_message(config: LossConfig, name: str) -> str:
    users, lacks = SETTING_USERS[name]
    names = [repr(u) for u in users]
    others = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    way = f"use objective {others}"
    if name in ("sigma", "learn_sigma"):
        way = f"{way}, or turn on the token-level CS term (token_lam > 0, with token features)"
    return (
        f"objective {config.objective!r} has {lacks}, so {name}={getattr(config, name)!r} would be ignored; "
        f"drop {name} (or set it back to its default, {LOSS_DEFAULTS[name]!r}) or {way}"
    )


class AlignmentLoss(nn.Module):
    """InfoNCE (optional) plus a weighted distribution divergence between image and text features.

    Call with image (N, D) and text (M, D) features; see `forward`.
    """

    def __init__(self, config: LossConfig | None = None, **overrides: object) -> None:
        super().__init__()
        _check_config(type(self).__name__, config)
        base = config or LossConfig()
        self.config = LossConfig(**{**base.__dict__, **overrides}) if overrides else base
        scale = math.log(1.0 / self.config.temperature)
        if self.config.learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(scale))
        else:
            self.register_buffer("logit_scale", torch.tensor(scale), persistent=False)
        if self.config.learn_sigma:
            self.log_sigma = nn.Parameter(torch.tensor(math.log(float(self.config.sigma))))

    @property
    def sigma(self) -> Bandwidth:
        """Kernel bandwidth: the learned value (clamped to >= 1e-3) or the configured one."""
        if self.config.learn_sigma:
            return torch.exp(self.log_sigma.clamp(min=math.log(1e-3)))
        return self.config.sigma

    @property
    def temperature(self) -> Tensor:
        """Current temperature; a learned one is clamped to >= 0.01 (CLIP clamps its logit scale at 100)."""
        if self.config.learn_temperature:
            return torch.exp(-self.logit_scale.clamp(max=-math.log(MIN_LEARNED_TEMPERATURE)))
        return torch.exp(-self.logit_scale)

    @checks_finite_once  # the terms' functions get the same tensors: their values are tested once
    @autocast_off  # the terms' own precision: normalising under autocast rounds unit vectors too
    def forward(
        self,
        image: Tensor,
        text: Tensor,
        text_to_image: Tensor | None = None,
        unpaired_images: Tensor | None = None,
        unpaired_texts: Tensor | None = None,
        image_tokens: Tensor | None = None,
        text_tokens: Tensor | None = None,
        image_token_mask: Tensor | None = None,
        text_token_mask: Tensor | None = None,
        shard: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the named loss terms.

        Args:
            image: (N, D) paired image features.
            text: (M, D) text features; M == N when paired one to one.
            text_to_image: optional (M,) image row of each text (several captions per image).
            unpaired_images: optional (P, D) images with no caption; they enter only the divergence,
                so only cs_aligner, mmd and kl take them (`LossConfig.takes_unpaired`); infonce and
                l2_prior raise ValueError rather than ignore them. P = 0 is the same as None.
            unpaired_texts: optional (Q, D) texts with no image; only the divergence, as above.
            image_tokens: optional (B, V, D) vision tokens for the token-level CS term, for B samples
                (all N images or a subset of them, e.g. train.token_images).
            text_tokens: optional (B, L, D) text tokens (one token set per image sample).
            image_token_mask: optional (B, V) bool (or 0/1), True for real tokens. Padding is ignored
                whatever it holds (even NaN) and gets zero gradient; only real tokens must be finite.
            text_token_mask: optional (B, L) bool (or 0/1).
            shard: the features are the global batch, the same on every rank of an initialised
                torch.distributed group (gathered with `all_gather_with_grad`): the infonce and
                cs_aligner objectives then split their Gram matrices by rows across the ranks
                (`infonce_cs_terms(shard=True)`); the other objectives compute in full on every rank.

        Returns:
            dict with "infonce" (if used), the divergence under its name ("cs", "mmd", "kl"),
            "token_cs" (if tokens are given) and the weighted total "loss"; float64 when any
            feature tensor is float64 (e.g. for gradcheck), else float32 (also for bf16/fp16).
        """
        cfg = self.config
        # Their values are tested through x and y (`defer_finite_check`): the fused path folds that
        # test into the host read it makes anyway, where a test here would be a GPU sync each.
        check_features("image", image, finite=False)
        check_features("text", text, finite=False)
        norm, norm_wide = self._casts(image, text, unpaired_images, unpaired_texts, image_tokens, text_tokens)
        x, y = norm(image), norm(text)
        defer_finite_check("image", image, x)
        defer_finite_check("text", text, y)
        if text_to_image is not None:  # int64 on x's device from here: l2_prior indexes with it
            text_to_image = check_text_to_image(text_to_image, x.shape[0], y.shape[0], x.device)
        xs, ys = self._pools(x, y, norm, image, text, unpaired_images, unpaired_texts)
        use_mi = cfg.objective != "l2_prior"
        terms = self._main_terms(x, y, xs, ys, text_to_image, use_mi, shard)
        total = terms["infonce"] if use_mi else terms["l2"]
        div_name = DIVERGENCE_TERMS.get(cfg.objective)
        if div_name is not None:
            total = total + cfg.lam * terms[div_name]
        for mask_name, mask, tokens_name, tokens in (
            ("image_token_mask", image_token_mask, "image_tokens", image_tokens),
            ("text_token_mask", text_token_mask, "text_tokens", text_tokens),
        ):
            if mask is not None and tokens is None:
                raise ValueError(f"{mask_name} was given without {tokens_name}; pass both or neither")
        if image_tokens is not None or text_tokens is not None:
            if image_tokens is None or text_tokens is None:
                raise ValueError("token-level CS needs both image_tokens and text_tokens; pass both or neither")
            terms["token_cs"] = self._token_cs(image_tokens, text_tokens, image_token_mask, text_token_mask, norm_wide)
            total = total + cfg.token_lam * terms["token_cs"]
        elif cfg.token_lam > 0:
            raise ValueError(f"token_lam={cfg.token_lam} > 0 needs image_tokens and text_tokens; pass them or set 0")
        terms["loss"] = total
        return terms

    def _casts(
        self, image: Tensor, text: Tensor, *others: Tensor | None
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The casts (and L2 normalisation, when configured) applied to every feature tensor of a call.

        Returns:
            (norm, norm_wide): `norm` for the pooled features and pools, `norm_wide` for the tokens.
            Both compute in float64 when any given feature tensor is float64 (gradcheck runs
            there), else in float32. Only `norm` keeps bf16/fp16 pairs in their dtype (normalised
            in float32), for the objectives that go through `infonce_cs_terms`: its Triton path
            then runs on tensor cores, and every path there accumulates in float32.
        """
        given = (image, text, *others)
        wide = torch.float64 if any(getattr(t, "dtype", None) == torch.float64 for t in given) else torch.float32
        half = image.dtype if image.dtype == text.dtype and image.dtype in (torch.bfloat16, torch.float16) else None
        keep = half if self.config.objective in ("cs_aligner", "infonce") else None
        normalize = self.config.normalize

        def norm_wide(t: Tensor) -> Tensor:
            t = t.to(wide)
            return F.normalize(t, dim=-1) if normalize else t

        def norm(t: Tensor) -> Tensor:
            return norm_wide(t) if keep is None else norm_wide(t).to(keep)

        return norm, norm_wide

    def _pools(
        self,
        x: Tensor,
        y: Tensor,
        norm: Callable[[Tensor], Tensor],
        image: Tensor,
        text: Tensor,
        unpaired_images: Tensor | None,
        unpaired_texts: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The samples the divergence compares: (N + P, D) images and (M + Q, D) texts, the pairs plus
        any unpaired extras (`is` x and y when there are none: the fused path checks)."""
        unpaired_images = _nonempty_pool("unpaired_images", unpaired_images, "image", image)
        unpaired_texts = _nonempty_pool("unpaired_texts", unpaired_texts, "text", text)
        given = [
            name
            for name, t in (("unpaired_images", unpaired_images), ("unpaired_texts", unpaired_texts))
            if t is not None
        ]
        if given and not self.config.takes_unpaired:
            # Dropping them silently would make e.g. "InfoNCE with unpaired data" a mislabelled InfoNCE run.
            raise ValueError(
                f"objective={self.config.objective!r} has no distribution divergence, the only term unpaired data "
                f"enters, so {' and '.join(given)} would be ignored; use objective {', '.join(DIVERGENCE_TERMS)} "
                "to train on unpaired data, or leave them out"
            )
        xs, ys = x, y
        if unpaired_images is not None:
            xs = torch.cat([x, norm(_pool("unpaired_images", unpaired_images, "image", image))])
        if unpaired_texts is not None:
            ys = torch.cat([y, norm(_pool("unpaired_texts", unpaired_texts, "text", text))])
        return xs, ys

    def _token_cs(
        self,
        image_tokens: Tensor,
        text_tokens: Tensor,
        image_token_mask: Tensor | None,
        text_token_mask: Tensor | None,
        norm: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Token-level D_CS of (B, V, D) and (B, L, D) tokens; padding may hold anything, even NaN."""
        mx = check_tokens("image_tokens", image_tokens, "image_token_mask", image_token_mask)  # (B, V)
        my = check_tokens("text_tokens", text_tokens, "text_token_mask", text_token_mask)  # (B, L)
        # Zero the padding before normalising: F.normalize's backward on a NaN row is NaN (0 * NaN),
        # and a module upstream that sums gradients over tokens (a bias) would turn NaN with it.
        xt = norm(image_tokens.masked_fill(~mx.unsqueeze(-1), 0.0))
        yt = norm(text_tokens.masked_fill(~my.unsqueeze(-1), 0.0))
        return token_cs_divergence(xt, yt, mx, my, sigma=self.sigma)

    def _main_terms(
        self, x: Tensor, y: Tensor, xs: Tensor, ys: Tensor, text_to_image: Tensor | None, use_mi: bool, shard: bool
    ) -> dict[str, Tensor]:
        cfg = self.config
        if cfg.objective in ("cs_aligner", "infonce"):
            from csaligner.kernels import infonce_cs_terms  # local: kernels import losses

            with_cs = cfg.objective == "cs_aligner"  # infonce: no pools (refused above), no bandwidth
            return infonce_cs_terms(
                x,
                y,
                xs if with_cs else None,
                ys if with_cs else None,
                temperature=self.temperature,
                sigma=resolve_bandwidth(self.sigma, xs, ys) if with_cs else 1.0,
                text_to_image=text_to_image,
                with_cs=with_cs,
                impl=cfg.impl,
                shard=shard,
            )
        terms = {"infonce": info_nce(x, y, self.temperature, text_to_image)} if use_mi else {}
        if cfg.objective == "mmd":
            terms["mmd"] = mmd(xs, ys, self.sigma)
        elif cfg.objective == "kl":
            terms["kl"] = gaussian_kl(xs, ys)
        elif cfg.objective == "l2_prior":
            target = x if text_to_image is None else x[text_to_image]
            if target.shape != y.shape:
                raise ValueError(
                    f"l2_prior pairs each text with one image: got {y.shape[0]} texts and {x.shape[0]} images; "
                    "pass text_to_image for several captions per image"
                )
            terms["l2"] = (y - target).pow(2).sum(-1).mean()  # Eclipse: ||prior(text) - image||^2
        return terms


class CSAlignerLoss(AlignmentLoss):
    """CS-Aligner: InfoNCE(x, y) + lam * D_CS(p(x), p(y)) on L2-normalised features (Eq. 6).

    Example:
        >>> loss_fn = CSAlignerLoss(lam=0.01, sigma=1.0)
        >>> out = loss_fn(image_feats, text_feats)   # {"infonce", "cs", "loss"}
        >>> out["loss"].backward()
    """

    def __init__(self, config: LossConfig | None = None, **overrides: object) -> None:
        _check_config(type(self).__name__, config)
        asked = overrides.get("objective", config.objective if config is not None else "cs_aligner")
        if asked != "cs_aligner":  # quietly training CS-Aligner when the config says otherwise would mislead
            raise ValueError(
                f"CSAlignerLoss is the cs_aligner objective, but objective={asked!r} was asked for; use "
                "AlignmentLoss(config) or build_objective(config) for the other objectives"
            )
        super().__init__(config, **{**overrides, "objective": "cs_aligner"})


def _check_config(cls: str, config: object) -> None:
    """A loss takes a `LossConfig` or keywords: `CSAlignerLoss(0.01)` put lam where the config goes."""
    if config is not None and not isinstance(config, LossConfig):
        raise TypeError(
            f"{cls} takes a LossConfig or its settings as keywords, e.g. {cls}(lam=0.01, sigma=1.0), "
            f"got {config!r} ({type(config).__name__}) as the config"
            + (f"; pass {cls}(**settings) for a dict" if isinstance(config, Mapping) else "")
        )


def _nonempty_pool(name: str, pool: Tensor | None, paired_name: str, paired: Tensor) -> Tensor | None:
    """None for an empty (0, D) pool, which adds no sample (a sampler whose unpaired items ran out), else `pool`."""
    if isinstance(pool, Tensor) and pool.dim() == 2 and pool.shape[0] == 0:
        check_same_dim(name, pool, paired_name, paired)
        return None
    return pool


def _pool(name: str, pool: Tensor, paired_name: str, paired: Tensor) -> Tensor:
    """Check an unpaired pool (P, D): finite features as wide as the paired side's (N, D)."""
    check_features(name, pool)
    check_same_dim(name, pool, paired_name, paired)
    return pool


OBJECTIVES: dict[str, str] = {
    "cs_aligner": "InfoNCE + lam * Cauchy-Schwarz divergence",
    "infonce": "InfoNCE only (CLIP)",
    "mmd": "InfoNCE + lam * Gaussian-kernel MMD^2",
    "kl": "InfoNCE + lam * KL between fitted Gaussians",
    "l2_prior": "L2 between mapped text and paired image embedding (Eclipse prior loss)",
}


def build_objective(config: LossConfig) -> AlignmentLoss:
    """Build the objective named by `config.objective`."""
    return AlignmentLoss(config)
