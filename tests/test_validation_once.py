"""`checks_finite_once`: a loss call tests each feature tensor's values once (each test is a host sync on a GPU)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from csaligner import CSAlignerLoss, cs_divergence, info_nce
from csaligner._validation import check_features, checks_finite_once
from csaligner.kernels import infonce_cs_terms


@pytest.fixture
def value_tests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names check_features tested the values of (its isfinite calls), in order."""
    names: list[str] = []
    real = torch.isfinite

    def spy(t: torch.Tensor) -> torch.Tensor:
        caller = sys._getframe(1)
        if caller.f_code.co_name == "check_features":
            names.append(caller.f_locals["name"])
        return real(t)

    monkeypatch.setattr(torch, "isfinite", spy)
    return names


def pair(n: int = 40, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_a_loss_call_tests_each_input_once(impl: str, value_tests: list[str]) -> None:
    x, y = pair()
    out = CSAlignerLoss(lam=0.1, impl=impl)(x.requires_grad_(), y)
    out["loss"].backward()
    assert value_tests == ["image", "text"]  # was 6 (dense) and 7 (chunked) tests, each a sync
    value_tests.clear()
    infonce_cs_terms(x, y, impl=impl, chunk_size=16)  # an entry point of its own
    assert value_tests == ["x", "y"]


def test_bad_values_are_still_found(value_tests: list[str]) -> None:
    x, y = pair()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN or Inf in 1 of 40"):
        CSAlignerLoss(lam=0.1)(bad, y)
    with pytest.raises(ValueError, match="y contains NaN or Inf in 1 of 40"):
        cs_divergence(x, bad)
    loss = CSAlignerLoss(lam=0.1)
    loss(x, y)
    with torch.no_grad():
        x[0, 0] = float("inf")  # the same tensor, changed in place after a call: tested again
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        loss(x, y)


def test_a_tensor_changed_in_place_within_a_call_is_tested_again(value_tests: list[str]) -> None:
    x, y = pair()

    @checks_finite_once
    def outer() -> None:
        check_features("x", x)
        check_features("x", x)  # the same, unchanged: no second test
        x.mul_(float("nan"))
        with pytest.raises(ValueError, match="x contains NaN"):
            check_features("x", x)

    outer()
    assert value_tests == ["x", "x", "x"]  # the first test; after the change, the test and the error's count
    check_features("y", y)  # outside any call: always tested
    check_features("y", y)
    assert value_tests == ["x", "x", "x", "y", "y"]
    assert info_nce(*pair(), 0.07).isfinite()


def test_inference_tensors_are_checked_and_tested() -> None:
    """Inference tensors (an encoder's output, or anything made under inference_mode) have no version
    counter: reading x._version raised 'Inference tensors do not track version counter', so every loss
    call under torch.inference_mode, or on features an encoder returned, failed."""
    loss = CSAlignerLoss(lam=0.1)
    with torch.inference_mode():
        x, y = pair()
        assert torch.isfinite(loss(x, y)["loss"])
        assert torch.isfinite(cs_divergence(x, y, 0.5))
        assert all(torch.isfinite(v).all() for v in infonce_cs_terms(x, y, impl="chunked", chunk_size=16).values())
    assert torch.isfinite(loss(x, y)["loss"])  # inference tensors used outside inference_mode
    with torch.inference_mode():
        bad = x.clone()

        @checks_finite_once
        def outer() -> None:
            check_features("bad", bad)
            bad[0, 0] = float("nan")  # changed in place in inference mode: no version to see it by
            with pytest.raises(ValueError, match="bad contains NaN"):
                check_features("bad", bad)

        outer()
