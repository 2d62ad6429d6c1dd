"""The Appendix B numbers and the synthetic two-modality data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csaligner import cs_divergence
from csaligner.toy import appendix_b_example, bivariate_gaussian_mi, sample_appendix_b, two_modalities_with_gap


def test_appendix_b_numbers() -> None:
    ex = appendix_b_example()
    assert round(ex.mutual_information, 3) == 1.959
    assert ex.kl_x_to_y == pytest.approx(6.81, abs=0.005)
    assert bivariate_gaussian_mi(0.0) == 0.0


def test_appendix_b_samples_have_the_stated_moments() -> None:
    ex = appendix_b_example()
    x, y = sample_appendix_b(ex, 200_000)
    assert float(torch.corrcoef(torch.stack([x, y]))[0, 1]) == pytest.approx(0.99, abs=1e-3)
    assert float(x.var()) == pytest.approx(3.0, rel=0.02) and float(y.mean()) == pytest.approx(3.0, abs=0.02)
    with pytest.raises(ValueError, match="rho must lie"):
        bivariate_gaussian_mi(1.0)


def test_two_modalities_have_a_gap_that_pairing_does_not_remove() -> None:
    img, txt, labels = two_modalities_with_gap(n=500, seed=3)
    assert img.shape == txt.shape == (500, 32) and labels.shape == (500,)
    gap = cs_divergence(F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
    same = cs_divergence(F.normalize(img[:250], dim=-1), F.normalize(img[250:], dim=-1))
    assert float(gap) > 10 * float(same)
