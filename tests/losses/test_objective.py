"""InfoNCE and the training objectives (CS-Aligner and baselines)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csaligner import AlignmentLoss, CSAlignerLoss, LossConfig, cs_divergence, info_nce
from csaligner.kernels import infonce_cs_terms
from csaligner.losses import contrastive
from csaligner.losses.contrastive import caption_counts
from csaligner.losses.divergence import gaussian_kl, mmd, token_cs_divergence
from tests.losses.reference import info_nce_loop


def test_info_nce_matches_loop_paired_and_multi_positive() -> None:
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert float(info_nce(x, y, 0.5)) == pytest.approx(info_nce_loop(x, y, 0.5), rel=1e-10)
    t2i = [0, 0, 1, 2, 2, 2, 3, 4]
    y8 = torch.randn(8, 4, dtype=torch.float64)
    got = info_nce(x, y8, 0.3, text_to_image=torch.tensor(t2i))
    assert float(got) == pytest.approx(info_nce_loop(x, y8, 0.3, t2i), rel=1e-10)
    # One caption per image in the multi-positive form equals the paired form.
    assert float(info_nce(x, y, 0.5, torch.arange(5))) == pytest.approx(float(info_nce(x, y, 0.5)), rel=1e-12)


def test_info_nce_finite_at_small_temperature_and_bf16() -> None:
    x = torch.randn(32, 8).bfloat16().requires_grad_()
    y = torch.randn(32, 8).bfloat16().requires_grad_()
    loss = info_nce(x, y, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_info_nce_errors_name_the_problem() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="as many texts as images"):
        info_nce(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"no caption in this batch \(rows \[3\]\)"):
        info_nce(x, torch.randn(3, 3), text_to_image=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\] \(the image rows\), got \[0, 4\]$"):
        info_nce(x, torch.randn(4, 3), text_to_image=torch.tensor([0, 1, 2, 4]))
    # PairedFeatures marks captions without an image -1: the error says where they go
    with pytest.raises(ValueError, match=r"got \[-1, 3\]; 2 caption\(s\) have no image .* pass them as unpaired_texts"):
        CSAlignerLoss()(x, torch.randn(6, 3), text_to_image=torch.tensor([0, 1, -1, 2, 3, -1]))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, torch.randn(4, 3), temperature=-1.0)


def test_caption_counts_match_bincount_without_a_host_read() -> None:
    g = torch.Generator().manual_seed(3)
    for n, m in ((1, 4), (7, 30), (50, 20)):
        t2i = torch.randint(0, n, (m,), generator=g)
        assert torch.equal(caption_counts(t2i, n), torch.bincount(t2i, minlength=n))
    # out of range: not counted (check_text_to_image reports them)
    assert caption_counts(torch.tensor([-1, 0, 0, 3, 5]), 4).tolist() == [2, 0, 0, 1]


def test_a_loss_call_validates_its_caption_map_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss module checks text_to_image (one host read) and hands the int64 map on: the InfoNCE
    and kernel functions it calls find it checked, rather than reading min, max and counts again."""
    validated: list[str] = []
    real = contrastive.caption_counts
    monkeypatch.setattr(contrastive, "caption_counts", lambda t, n: (validated.append("map"), real(t, n))[1])
    x, y = torch.randn(6, 8), torch.randn(15, 8)
    t2i = torch.arange(15, dtype=torch.int32) % 6  # int32, as a numpy-built map: converted once
    for impl in ("dense", "chunked"):
        validated.clear()
        out = CSAlignerLoss(lam=0.5, impl=impl)(x, y, text_to_image=t2i)
        assert validated == ["map"]
        assert float(out["infonce"]) == pytest.approx(float(info_nce(x, y, 0.07, t2i.long())), rel=1e-5)


def test_cs_aligner_loss_terms_and_total() -> None:
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    out = CSAlignerLoss(lam=0.5, sigma=0.8)(x, y)
    assert set(out) == {"infonce", "cs", "loss"}
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    assert torch.allclose(out["infonce"], info_nce(x, y, 0.07))
    assert torch.allclose(out["cs"], cs_divergence(xn, yn, 0.8))
    assert torch.allclose(out["loss"], out["infonce"] + 0.5 * out["cs"])
    assert torch.allclose(CSAlignerLoss(lam=0.0)(x, y)["loss"], out["infonce"])


def test_unpaired_pools_enter_only_the_cs_term() -> None:
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    ux, uy = torch.randn(5, 6) + 1, torch.randn(3, 6)
    loss = CSAlignerLoss(lam=1.0)
    base, more = loss(x, y), loss(x, y, unpaired_images=ux, unpaired_texts=uy)
    assert torch.allclose(base["infonce"], more["infonce"])
    pooled_x = F.normalize(torch.cat([x, ux]), dim=-1)
    pooled_y = F.normalize(torch.cat([y, uy]), dim=-1)
    assert torch.allclose(more["cs"], cs_divergence(pooled_x, pooled_y))


@pytest.mark.parametrize("objective", ["infonce", "l2_prior"])
@pytest.mark.parametrize("pool", ["unpaired_images", "unpaired_texts"])
def test_an_objective_without_a_divergence_refuses_unpaired_pools(objective: str, pool: str) -> None:
    """infonce and l2_prior have no term for unpaired data: they ignored the pools silently."""
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    loss_fn = AlignmentLoss(objective=objective)
    assert not loss_fn.config.takes_unpaired
    with pytest.raises(ValueError, match=rf"objective='{objective}' has no distribution divergence.*{pool} would be "):
        loss_fn(x, y, **{pool: torch.randn(3, 6)})


@pytest.mark.parametrize(("objective", "divergence"), [("mmd", mmd), ("kl", gaussian_kl)])
def test_mmd_and_kl_take_the_unpaired_pools_into_their_divergence(objective: str, divergence: Callable) -> None:
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    ux, uy = torch.randn(5, 6) + 1, torch.randn(3, 6)
    loss_fn = AlignmentLoss(objective=objective)
    assert loss_fn.config.takes_unpaired
    out = loss_fn(x, y, unpaired_images=ux, unpaired_texts=uy)
    pooled_x, pooled_y = F.normalize(torch.cat([x, ux]), dim=-1), F.normalize(torch.cat([y, uy]), dim=-1)
    assert torch.allclose(out[objective], divergence(pooled_x, pooled_y), atol=1e-6)
    assert torch.allclose(out["infonce"], loss_fn(x, y)["infonce"])


def test_multi_caption_and_token_terms() -> None:
    x, y = torch.randn(4, 6), torch.randn(10, 6)
    t2i = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    xt, yt = torch.randn(4, 7, 6), torch.randn(4, 5, 6)
    out = CSAlignerLoss(lam=1.0, token_lam=0.3)(x, y, text_to_image=t2i, image_tokens=xt, text_tokens=yt)
    assert set(out) == {"infonce", "cs", "token_cs", "loss"}
    assert torch.allclose(out["loss"], out["infonce"] + out["cs"] + 0.3 * out["token_cs"])
    with pytest.raises(ValueError, match="needs image_tokens and text_tokens"):
        CSAlignerLoss(token_lam=0.3)(x, y, text_to_image=t2i)


def test_learnable_temperature_gets_gradient() -> None:
    loss = CSAlignerLoss(learn_temperature=True, temperature=0.1)
    assert float(loss.temperature.detach()) == pytest.approx(0.1, rel=1e-5)
    loss(torch.randn(8, 4), torch.randn(8, 4))["loss"].backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)


@pytest.mark.parametrize(("objective", "div"), [("infonce", None), ("mmd", "mmd"), ("kl", "kl")])
def test_baselines_share_the_call_shape(objective: str, div: str | None) -> None:
    x, y = torch.randn(12, 5, requires_grad=True), torch.randn(12, 5)
    weight = {"lam": 0.2} if div else {}  # infonce has no divergence to weigh (and refuses lam)
    out = AlignmentLoss(LossConfig(objective=objective, **weight))(x, y)  # type: ignore[arg-type]
    expected = {"infonce", "loss"} | ({div} if div else set())
    assert set(out) == expected
    out["loss"].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_l2_prior_loss_is_eclipse_objective() -> None:
    x, y = torch.randn(3, 4), torch.randn(6, 4)
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    out = AlignmentLoss(objective="l2_prior")(x, y, text_to_image=t2i)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    assert torch.allclose(out["loss"], (yn - xn[t2i]).pow(2).sum(-1).mean())
    assert set(out) == {"l2", "loss"}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_l2_prior_takes_text_to_image_of_any_integer_dtype(dtype: torch.dtype) -> None:
    # The objective checked text_to_image but indexed with the caller's tensor: int16 was refused by indexing
    # and uint8 was read as a boolean mask over the images.
    x, y = torch.randn(3, 4), torch.randn(6, 4)
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    want = AlignmentLoss(objective="l2_prior")(x, y, text_to_image=t2i)["loss"]
    got = AlignmentLoss(objective="l2_prior")(x, y, text_to_image=t2i.to(dtype))["loss"]
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_eq10_alignment_uniformity_decomposition() -> None:
    """For unit-norm features and lambda = 1 the loss splits into Wang & Isola style terms:

    InfoNCE = A / (2 tau) + 1/2 [mean_i LSE_j(-d_ij^2 / 2tau) + mean_j LSE_i(-d_ij^2 / 2tau)]
    D_CS    = U(x) + U(y) - 2 U(x, y),  U(a, b) = log mean exp(-||a_i - b_j||^2 / (2 sigma^2))
    with A = mean_i ||x_i - y_i||^2 the alignment term (using <a, b> = 1 - ||a - b||^2 / 2)."""
    tau, sigma = 0.2, 0.7
    x = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
    d2 = torch.cdist(x, y) ** 2
    align = d2.diagonal().mean()
    lse = 0.5 * (torch.logsumexp(-d2 / (2 * tau), 1).mean() + torch.logsumexp(-d2 / (2 * tau), 0).mean())

    def uniformity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.exp(-(torch.cdist(a, b) ** 2) / (2 * sigma**2)).mean())

    decomposed = align / (2 * tau) + lse + uniformity(x, x) + uniformity(y, y) - 2 * uniformity(x, y)
    out = CSAlignerLoss(lam=1.0, sigma=sigma, temperature=tau)(x, y)
    assert float(out["loss"]) == pytest.approx(float(decomposed), rel=1e-5)


def test_loss_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown objective 'clip'"):
        LossConfig(objective="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam must be"):
        LossConfig(lam=-1.0)
    with pytest.raises(ValueError, match="sigma must be"):
        LossConfig(sigma=0.0)
    with pytest.raises(ValueError, match="impl must be"):
        LossConfig(impl="cuda")  # type: ignore[arg-type]


def test_learnable_sigma_gets_gradient_and_matches_fixed_value() -> None:
    x, y = torch.randn(10, 4), torch.randn(10, 4) + 0.5
    learned = CSAlignerLoss(lam=1.0, sigma=0.7, learn_sigma=True)
    out = learned(x, y)
    assert torch.allclose(out["cs"], CSAlignerLoss(lam=1.0, sigma=0.7)(x, y)["cs"], atol=1e-6)
    out["loss"].backward()
    assert learned.log_sigma.grad is not None and float(learned.log_sigma.grad.abs()) > 0
    with pytest.raises(ValueError, match="learn_sigma needs a numeric"):
        LossConfig(sigma="median", learn_sigma=True)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_cs_aligner_loss_keeps_bf16_features_in_bf16_and_matches_float32(impl: str) -> None:
    """bf16 features reach the kernels in bf16 (tensor cores on CUDA); the terms stay float32 and
    agree with the float32 computation on the same values to bf16 rounding of the normalised rows."""
    x, y = torch.randn(48, 16).bfloat16().requires_grad_(), torch.randn(48, 16).bfloat16().requires_grad_()
    loss_fn = CSAlignerLoss(lam=0.5, sigma=0.8, impl=impl)  # type: ignore[arg-type]
    got = loss_fn(x, y)
    want = loss_fn(x.float(), y.float())
    assert got["loss"].dtype == torch.float32
    for k in ("infonce", "cs", "loss"):
        assert float(got[k].detach()) == pytest.approx(float(want[k].detach()), rel=2e-2, abs=2e-3)
    got["loss"].backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("objective", ["cs_aligner", "infonce", "mmd", "kl", "l2_prior"])
def test_float64_features_give_float64_terms(objective: str) -> None:
    """The loss cast every feature to float32: float64 inputs came back as float32 terms."""
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    xt, yt = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64)
    out = AlignmentLoss(objective=objective, token_lam=0.3)(x, y, image_tokens=xt, text_tokens=yt)  # type: ignore[arg-type]
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, torch.float64)


@pytest.mark.parametrize(
    ("objective", "impl"),
    [("cs_aligner", "dense"), ("cs_aligner", "chunked"), ("infonce", "chunked"), ("mmd", "auto"), ("kl", "auto"),
     ("l2_prior", "auto")],
)  # fmt: skip
def test_float64_gradcheck_through_every_objective(objective: str, impl: str) -> None:
    """float64 gradcheck failed on float32 rounding inside the loss."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    settings = {"impl": impl, "lam": 0.5, "temperature": 0.5}
    ignored = {"infonce": ("lam",), "l2_prior": ("lam", "temperature")}.get(objective, ())  # refused if given
    loss_fn = AlignmentLoss(objective=objective, **{k: v for k, v in settings.items() if k not in ignored})  # type: ignore[arg-type]
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b)["loss"], (x, y))


def test_float64_gradcheck_through_the_token_term() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    yt = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = CSAlignerLoss(token_lam=1.0, sigma=0.8)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(x, y, image_tokens=a, text_tokens=b)["token_cs"], (xt, yt))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_fixed_temperature_below_the_learned_clamp_is_used_as_given(impl: str) -> None:
    """CLIP's clamp (temperature >= 0.01) is for a learned temperature; a fixed one is not changed."""
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    loss_fn = CSAlignerLoss(temperature=0.005, impl=impl)  # type: ignore[arg-type]
    assert float(loss_fn.temperature) == pytest.approx(0.005, rel=1e-6)
    assert float(loss_fn(x, y)["infonce"]) == pytest.approx(float(info_nce(x, y, 0.005)), rel=1e-5)


def test_learned_temperature_may_not_start_below_its_clamp() -> None:
    with pytest.raises(ValueError, match=r"learn_temperature.*0\.01.*got 0\.005"):
        LossConfig(temperature=0.005, learn_temperature=True)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_int32_text_to_image_is_accepted_by_every_path(impl: str) -> None:
    """check_text_to_image accepts any integer dtype (e.g. int32 from numpy); cross_entropy needs int64."""
    x, y = torch.randn(4, 6), torch.randn(7, 6)
    t2i = torch.tensor([0, 0, 1, 2, 2, 3, 3])
    want = info_nce(x, y, 0.1, text_to_image=t2i)
    assert float(info_nce(x, y, 0.1, text_to_image=t2i.int())) == pytest.approx(float(want), rel=1e-6)
    got = CSAlignerLoss(temperature=0.1, impl=impl)(x, y, text_to_image=t2i.int())  # type: ignore[arg-type]
    assert float(got["infonce"]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("objective", ["cs_aligner", "mmd"])
def test_unpaired_pool_of_another_width_is_a_clear_error(objective: str) -> None:
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    loss_fn = AlignmentLoss(objective=objective)
    with pytest.raises(ValueError, match="unpaired_texts has D=5"):
        loss_fn(x, y, unpaired_texts=torch.randn(2, 5))
    with pytest.raises(ValueError, match="unpaired_images has D=3"):
        loss_fn(x, y, unpaired_images=torch.randn(2, 3))


def test_token_masks_without_tokens_are_an_error() -> None:
    """A mask with no tokens to mask was ignored; the prior adapter refuses the same call."""
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="image_token_mask was given without image_tokens"):
        CSAlignerLoss()(x, y, image_token_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_token_mask was given without text_tokens"):
        CSAlignerLoss()(x, y, text_token_mask=torch.ones(4, 3, dtype=torch.bool))


def test_cs_aligner_loss_refuses_a_config_of_another_objective() -> None:
    with pytest.raises(ValueError, match=r"objective='mmd'.*build_objective"):
        CSAlignerLoss(LossConfig(objective="mmd"))
    with pytest.raises(ValueError, match=r"objective='kl'"):
        CSAlignerLoss(objective="kl")
    assert CSAlignerLoss(LossConfig(objective="cs_aligner")).config.objective == "cs_aligner"


@pytest.mark.parametrize("field", ["sigma", "temperature"])
def test_a_bool_bandwidth_or_temperature_is_an_error(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a finite number > 0, got the bool True"):
        LossConfig(**{field: True})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["lam", "token_lam"])
@pytest.mark.parametrize("value", [True, False, "0.1", None])
def test_a_weight_that_is_not_a_number_is_an_error(field: str, value: object) -> None:
    # lam=True read as 1.0 (100 times the paper's weight); a string raised a TypeError from math.isfinite.
    with pytest.raises(ValueError, match=re.escape(f"{field} must be a finite number >= 0, got {value!r}")):
        LossConfig(**{field: value})  # type: ignore[arg-type]


def test_a_string_temperature_is_an_error() -> None:
    # check_positive took float("0.1") for a number; AlignmentLoss then failed on math.log(1 / "0.1").
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got '0\.1'"):
        LossConfig(temperature="0.1")  # type: ignore[arg-type]


def test_token_term_ignores_nan_padding_in_value_and_gradient() -> None:
    """The loss refused NaN padding that the prior adapter accepts; now both ignore it. The padding is zeroed
    before the tokens are normalised: F.normalize's backward on a NaN row is NaN, and a module that sums the
    token gradients (here a learned shift) would turn NaN."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    xt, yt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    ym = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])  # 0/1 ints, as from a tokenizer
    loss_fn = CSAlignerLoss(token_lam=1.0)
    want = loss_fn(x, y, image_tokens=xt, text_tokens=yt, text_token_mask=ym)["token_cs"]
    raw = yt.clone()
    raw[ym == 0] = float("nan")
    raw.requires_grad_()
    shift = torch.zeros(4, requires_grad=True)  # a module upstream of the loss that sums over tokens
    got = loss_fn(x, y, image_tokens=xt, text_tokens=raw + shift, text_token_mask=ym)["token_cs"]
    assert torch.allclose(got, want)
    got.backward()
    assert raw.grad is not None and torch.equal(raw.grad[ym == 0], torch.zeros_like(raw.grad[ym == 0]))
    assert shift.grad is not None and torch.isfinite(shift.grad).all() and shift.grad.abs().sum() > 0
    bad = raw.detach().clone()
    bad[0, 0, 0] = float("nan")  # a real token
    with pytest.raises(ValueError, match="text_tokens contains NaN or Inf in 1 of 4 real"):
        loss_fn(x, y, image_tokens=xt, text_tokens=bad, text_token_mask=ym)


def test_a_soft_token_mask_is_an_error_and_a_0_1_int_mask_is_a_mask() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    hard = torch.ones(3, 5, dtype=torch.long)
    hard[:, 3:] = 0  # HF-style attention mask
    loss = CSAlignerLoss(token_lam=1.0)
    want = loss(x[:, 0], y[:, 0], image_tokens=x, text_tokens=y, text_token_mask=hard.bool())["token_cs"]
    got = loss(x[:, 0], y[:, 0], image_tokens=x, text_tokens=y, text_token_mask=hard)["token_cs"]
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        loss(x[:, 0], y[:, 0], image_tokens=x, text_tokens=y, text_token_mask=hard * 0.5 + 0.5)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_a_temperature_or_bandwidth_of_several_values_is_an_error(impl: str) -> None:
    """A (2,) temperature broadcast over the 2 texts' columns of the logits: a loss, silently, with two temperatures."""
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    pair = torch.tensor([0.07, 0.5])
    with pytest.raises(ValueError, match=r"temperature must be a single number .* shape \(2,\)"):
        info_nce(x, y, temperature=pair)
    with pytest.raises(ValueError, match=r"sigma must be a single number .* shape \(2,\)"):
        cs_divergence(x, y, sigma=pair)
    with pytest.raises(ValueError, match=r"temperature must be a single number .* shape \(2,\)"):
        infonce_cs_terms(x, y, temperature=pair, impl=impl)
    with pytest.raises(ValueError, match=r"sigma must be a single number .* shape \(1, 1\)"):
        infonce_cs_terms(x, y, sigma=torch.ones(1, 1), impl=impl)
    one = infonce_cs_terms(x, y, temperature=torch.tensor([0.1]), sigma=torch.tensor(0.5), impl=impl)
    ref = infonce_cs_terms(x, y, temperature=0.1, sigma=0.5, impl=impl)
    assert all(torch.allclose(one[k], ref[k]) for k in ref)  # a one-element tensor is one number


def test_an_index_map_weights_or_mask_that_is_not_a_tensor_names_the_conversion() -> None:
    """A list or a numpy array raised AttributeError: 'list' object has no attribute 'to' (or 'shape')."""
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    t2i = [0, 1, 2, 0, 1]
    with pytest.raises(TypeError, match=r"text_to_image must be a torch.Tensor .* got list.*torch.as_tensor"):
        CSAlignerLoss()(x, y, text_to_image=t2i)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"text_to_image must be a torch.Tensor .* got ndarray"):
        info_nce(x, y, text_to_image=np.array(t2i))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"x_weights must be a torch.Tensor .* got list"):
        cs_divergence(x, y, x_weights=[1.0, 1.0, 0.0])  # type: ignore[arg-type]
    tokens = torch.randn(3, 2, 4)
    with pytest.raises(TypeError, match=r"image_token_mask must be a torch.Tensor .* got list"):
        CSAlignerLoss(token_lam=1.0)(
            x,
            y[:3],
            image_tokens=tokens,
            text_tokens=tokens,
            image_token_mask=[[1, 1]] * 3,  # type: ignore[arg-type]
        )
    torch.testing.assert_close(  # converted, it is the same loss
        CSAlignerLoss()(x, y, text_to_image=torch.as_tensor(t2i))["loss"],
        CSAlignerLoss()(x, y, text_to_image=torch.tensor(t2i, dtype=torch.long))["loss"],
    )


def test_a_learned_bandwidth_keeps_float64_terms_exact_on_every_path() -> None:
    """The dense path squared a learned (float32) sigma in float32: in float64 its D_CS was 4e-7 off the chunked
    one and off cs_divergence at the same sigma (sigma=0.05 scales that rounding by 1/sigma^2)."""
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t2i = torch.arange(30) % 20
    terms = {
        impl: CSAlignerLoss(lam=1.0, sigma=0.05, learn_sigma=True, impl=impl)(x, y, text_to_image=t2i)
        for impl in ("dense", "chunked")
    }
    sigma = float(CSAlignerLoss(sigma=0.05, learn_sigma=True).sigma.detach())  # the float32 value it starts from
    ref = cs_divergence(F.normalize(x, dim=-1), F.normalize(y, dim=-1), sigma=sigma)
    for impl, out in terms.items():
        assert out["cs"].dtype == torch.float64
        torch.testing.assert_close(out["cs"], ref, rtol=1e-12, atol=0, msg=impl)
    tokens = torch.randn(4, 3, 8, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)
    token_cs = token_cs_divergence(*tokens, sigma=torch.tensor(0.05, dtype=torch.float32))
    token_ref = token_cs_divergence(*tokens, sigma=float(torch.tensor(0.05)))
    torch.testing.assert_close(token_cs, token_ref, rtol=1e-12, atol=0)


def test_an_ambient_autocast_leaves_every_term_and_gradient_as_without_it() -> None:
    """Under torch.autocast the dense references ran their matmuls in bfloat16: D_CS at sigma 0.05 was 0.36 instead
    of 0.92 (||a||^2 + ||b||^2 - 2 a.b cancels), while the chunked path ignored autocast, so impl="auto" changed
    the loss with the batch size. A training loop that autocasts its adapters must get the loss of their output."""
    x = torch.randn(32, 16)
    y = x + 0.05 * torch.randn(32, 16)
    adapter = torch.nn.Linear(16, 16)
    tokens = torch.randn(4, 5, 16), torch.randn(4, 3, 16)
    settings = {"lam": 1.0, "sigma": 0.05, "temperature": 0.01, "token_lam": 1.0}
    for impl in ("dense", "chunked"):
        loss_fn = CSAlignerLoss(**settings, impl=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mapped = adapter(x)  # bfloat16, as in a mixed-precision training step
            got = loss_fn(mapped, y, image_tokens=tokens[0], text_tokens=tokens[1])
        (grad,) = torch.autograd.grad(got["loss"], mapped)
        same = mapped.detach().requires_grad_()  # the same bfloat16 features, outside autocast
        plain = loss_fn(same, y, image_tokens=tokens[0], text_tokens=tokens[1])
        (plain_grad,) = torch.autograd.grad(plain["loss"], same)
        for name in ("infonce", "cs", "token_cs", "loss"):
            torch.testing.assert_close(got[name], plain[name], msg=f"{impl} {name}")
        torch.testing.assert_close(grad, plain_grad, msg=f"{impl} gradient")
    functions = {
        "cs_divergence": lambda: cs_divergence(x, y, sigma=0.05),
        "info_nce": lambda: info_nce(x, y, 0.01),
        "mmd": lambda: mmd(x, y, 0.05),
        "token_cs_divergence": lambda: token_cs_divergence(*tokens, sigma=0.05),
    }
    for name, fn in functions.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = fn()
        torch.testing.assert_close(under, fn(), msg=name)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_an_empty_unpaired_pool_is_no_pool(impl: str) -> None:
    """A (0, D) pool (an unpaired sampler that ran out) was an error, 'unpaired_images is empty'; it adds no sample."""
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    loss_fn = CSAlignerLoss(lam=1.0, impl=impl)
    ref = loss_fn(x, y)
    got = loss_fn(x, y, unpaired_images=torch.empty(0, 4), unpaired_texts=torch.empty(0, 4))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="feature dims differ: unpaired_texts has D=5, text has D=4"):
        loss_fn(x, y, unpaired_texts=torch.empty(0, 5))


def test_settings_in_the_config_slot_are_a_type_error_that_says_keywords() -> None:
    """CSAlignerLoss(0.01) (lam first, as the README's table lists it) was AttributeError: 'float' object has no
    attribute 'objective'; a dict of settings the same."""
    with pytest.raises(TypeError, match=r"CSAlignerLoss takes a LossConfig or its settings as keywords.*got 0.01"):
        CSAlignerLoss(0.01)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got \{'lam': 0.1\} \(dict\).*pass AlignmentLoss\(\*\*settings\)"):
        AlignmentLoss({"lam": 0.1})  # type: ignore[arg-type]
