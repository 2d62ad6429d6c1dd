"""`checks_finite_once`: a loss call tests each feature tensor's values once (each test is a host sync on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csaligner import CSAlignerLoss, _validation, cs_divergence, info_nce
from csaligner._validation import check_features, checks_finite_once, defer_finite_check, record_finite
from csaligner.kernels import infonce_cs_terms
from csaligner.losses import AlignmentLoss, LossConfig


@pytest.fixture
def value_tests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names whose values were tested (each test one host read), in order."""
    names: list[str] = []
    real = _validation._test_finite

    def spy(name: str, t: torch.Tensor) -> None:
        names.append(name)
        real(name, t)

    monkeypatch.setattr(_validation, "_test_finite", spy)
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
    assert value_tests == ["x", "x"]  # the first test; after the change, the test again
    check_features("y", y)  # outside any call: always tested
    check_features("y", y)
    assert value_tests == ["x", "x", "y", "y"]
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


@pytest.mark.parametrize("objective", ["cs_aligner", "infonce", "mmd", "kl", "l2_prior"])
def test_the_loss_inputs_are_tested_through_their_normalised_copies(objective: str, value_tests: list[str]) -> None:
    """`AlignmentLoss` defers the tests of image and text to the first test of x and y (their unit
    copies), so the fused path can fold them into its host read; every objective still tests each
    once, names the argument the caller passed, and counts its rows, l2_prior (which tests nothing
    itself) at the end of the call."""
    x, y = pair()
    loss = AlignmentLoss(LossConfig(objective=objective))
    loss(x, y)
    assert value_tests[:2] == ["image", "text"] and len(value_tests) == len(set(value_tests))
    for name, (a, b) in (("image", (x.clone(), y)), ("text", (x, y.clone()))):
        bad = a if name == "image" else b
        bad[[2, 5], 0] = float("nan")
        bad[7, 1] = float("inf")
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf in 3 of 40 feature vectors"):
            loss(a, b)


def test_the_inputs_are_reported_before_an_unpaired_pool(value_tests: list[str]) -> None:
    x, y = pair()
    pool = F.normalize(torch.randn(6, 8), dim=-1)
    bad_x, bad_pool = x.clone(), pool.clone()
    bad_x[0, 0] = bad_pool[1, 0] = float("nan")
    loss = CSAlignerLoss(lam=0.1, impl="chunked")
    with pytest.raises(ValueError, match="image contains NaN or Inf in 1 of 40"):
        loss(bad_x, y, unpaired_images=bad_pool)
    with pytest.raises(ValueError, match="unpaired_images contains NaN or Inf in 1 of 6"):
        loss(x, y, unpaired_images=bad_pool)
    value_tests.clear()
    loss(x, y, unpaired_images=pool)
    assert value_tests[:3] == ["image", "text", "unpaired_images"]


def test_defer_finite_check(value_tests: list[str]) -> None:
    x, _ = pair()
    bad = x.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(ValueError, match="raw contains NaN or Inf in 1 of 40"):
        defer_finite_check("raw", bad, bad * 2)  # outside a checks_finite_once call: tested now
    value_tests.clear()

    @checks_finite_once
    def read_by_caller(source: torch.Tensor) -> torch.Tensor:
        derived = source.double()
        defer_finite_check("raw", source, derived)
        assert value_tests == []  # deferred
        record_finite(derived)  # a caller's own read found it finite: its source is too
        check_features("raw", source)
        return derived

    read_by_caller(x)
    assert value_tests == []

    @checks_finite_once
    def never_tested(source: torch.Tensor) -> torch.Tensor:
        derived = F.normalize(source, dim=-1)
        defer_finite_check("raw", source, derived)
        return derived  # no check_features on derived: tested when the outermost call returns

    never_tested(x)
    assert value_tests == ["raw"]
    with pytest.raises(ValueError, match="raw contains NaN or Inf in 1 of 40"):
        never_tested(bad)

    @checks_finite_once
    def named_by_source(source: torch.Tensor) -> None:
        derived = F.normalize(source, dim=-1)
        defer_finite_check("raw", source, derived)
        check_features("x", derived)

    with pytest.raises(ValueError, match="raw contains NaN or Inf in 1 of 40"):
        named_by_source(bad)


def test_a_failed_call_leaves_no_deferred_test_behind() -> None:
    """Inside an outer `checks_finite_once` call (a trainer that skips a bad batch), a loss call that
    raised for its NaN input must not hand that input's pending test to the next call."""
    x, y = pair()
    bad = x.clone()
    bad[0, 0] = float("nan")
    seen: list[str] = []

    @checks_finite_once
    def two_steps(objective: str) -> None:
        loss = AlignmentLoss(LossConfig(objective=objective))
        for a in (bad, x):
            try:
                loss(a, y)
                seen.append("ok")
            except _validation.NonFiniteFeaturesError as err:
                seen.append(f"{err.name} {err.n_bad}")

    for objective in ("cs_aligner", "l2_prior"):  # l2_prior tests nothing itself: at the inner call's return
        seen.clear()
        two_steps(objective)
        assert seen == ["image 1", "ok"]


def test_a_nan_input_is_reported_before_other_errors() -> None:
    """Deferred, the inputs' test would otherwise come after whatever the call checks first."""
    x, y = pair()
    bad = x.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN or Inf in 1 of 40"):
        CSAlignerLoss()(bad, y, text_to_image=torch.full((40,), 50))  # also an out-of-range map
    with pytest.raises(ValueError, match="must lie in"):
        CSAlignerLoss()(x, y, text_to_image=torch.full((40,), 50))  # finite: the map's own error


def test_a_source_changed_in_place_is_not_taken_as_tested() -> None:
    x, _ = pair()

    @checks_finite_once
    def changed() -> None:
        derived = x.double()
        defer_finite_check("raw", x, derived)
        with torch.no_grad():
            x[1, 1] = float("nan")  # after the copy: derived is finite, x no longer is
        record_finite(derived)
        check_features("raw", x)  # so x is tested itself

    with pytest.raises(ValueError, match="raw contains NaN or Inf in 1 of 40"):
        changed()
