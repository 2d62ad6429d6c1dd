"""Zero-shot on constructed embeddings; few-shot prototype / logreg on clusters and on noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from csaligner.eval import class_prompts, few_shot_accuracy, zero_shot_accuracy

E = torch.eye(6)


def test_class_prompts() -> None:
    prompts = class_prompts(["cat", "pink primrose"], templates=("a photo of a {}.", "art of the {}."))
    assert prompts == [
        ["a photo of a cat.", "art of the cat."],
        ["a photo of a pink primrose.", "art of the pink primrose."],
    ]
    assert len(class_prompts(["dog"])[0]) == 7  # CLIP's 7-template ensemble by default
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["dog"], templates=("no placeholder",))


def test_zero_shot_exact_accuracies() -> None:
    classes = E[:3]  # class c is the one-hot e_c
    image = torch.stack([E[0], E[0], E[1], E[1], E[0]]) + 0.01 * E[5]
    labels = torch.tensor([0, 0, 0, 1, 2])  # correct: yes, yes, no, yes, no
    out = zero_shot_accuracy(image, classes, labels)
    assert out["top1"] == pytest.approx(60.0)
    assert out["per_class"] == pytest.approx([200 / 3, 100.0, 0.0])
    assert out["mean_per_class"] == pytest.approx((200 / 3 + 100.0 + 0.0) / 3)
    assert out["top5"] == 100.0  # only 3 classes


def test_zero_shot_top5_and_absent_class() -> None:
    image = torch.tensor([[6.0, 5, 4, 3, 2, 1]]).repeat(2, 1)  # class scores decrease with the index
    out = zero_shot_accuracy(image, E, torch.tensor([4, 5]))  # 4 classes ahead of class 4, 5 ahead of class 5
    assert out["top1"] == 0.0
    assert out["top5"] == pytest.approx(50.0)
    assert math.isnan(out["per_class"][0])  # no image of class 0: excluded from the class mean
    assert out["mean_per_class"] == 0.0


def test_zero_shot_prompts_are_averaged_after_normalisation() -> None:
    # Class 0's prompts point at e0 (norm 10) and e1; normalised first, their mean lies at 45 degrees.
    prompts = torch.stack([torch.stack([10 * E[0], E[1]]), torch.stack([E[2], E[2]])])  # (C=2, P=2, D)
    image = (E[1] + 0.5 * E[2]).unsqueeze(0)
    assert zero_shot_accuracy(image, prompts, torch.tensor([0]))["top1"] == 100.0
    # Averaging raw prompts would point class 0 at e0 and lose this image.
    assert zero_shot_accuracy(image, prompts.mean(1), torch.tensor([0]))["top1"] == 0.0


def test_zero_shot_chunking_does_not_change_the_result() -> None:
    image, labels, classes = torch.randn(50, 8), torch.randint(0, 4, (50,)), torch.randn(4, 3, 8)
    assert zero_shot_accuracy(image, classes, labels, chunk_size=7) == zero_shot_accuracy(image, classes, labels)


def test_zero_shot_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        zero_shot_accuracy(torch.randn(2, 6), E[:3], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(C, P, D\)"):
        zero_shot_accuracy(torch.randn(2, 6), torch.randn(6), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="feature dims differ"):
        zero_shot_accuracy(torch.randn(2, 5), E[:3], torch.tensor([0, 1]))


def clusters(n_per_class: int, num_classes: int = 5, d: int = 16, noise: float = 0.3) -> tuple[Tensor, Tensor]:
    centers = torch.nn.functional.normalize(torch.randn(num_classes, d), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(labels.numel(), d) / d**0.5, labels


@pytest.mark.parametrize("method", ["prototype", "logreg"])
def test_few_shot_separable_clusters(method: str) -> None:
    full, full_y = clusters(40)
    train, train_y, test, test_y = full[::2], full_y[::2], full[1::2], full_y[1::2]
    out = few_shot_accuracy(train, train_y, test, test_y, shots=(1, 4), seeds=(0, 1), method=method)  # type: ignore[arg-type]
    assert list(out) == ["1-shot", "1-shot_std", "4-shot", "4-shot_std"]
    assert out["1-shot"] > 95.0 and out["4-shot"] > 99.0


@pytest.mark.parametrize("method", ["prototype", "logreg"])
def test_few_shot_random_labels_is_chance(method: str) -> None:
    x, y = torch.randn(1200, 16), torch.randint(0, 5, (1200,))
    out = few_shot_accuracy(x[:200], y[:200], x[200:], y[200:], shots=(8,), seeds=(0, 1, 2), method=method)  # type: ignore[arg-type]
    assert 14.0 < out["8-shot"] < 26.0  # chance is 20%
    assert out["8-shot_std"] > 0.0  # different seeds draw different shots


def test_few_shot_is_seeded_and_one_seed_has_zero_std() -> None:
    x, y = torch.randn(100, 8), torch.arange(100) % 4
    a = few_shot_accuracy(x[:60], y[:60], x[60:], y[60:], shots=(2,), seeds=(3,))
    b = few_shot_accuracy(x[:60], y[:60], x[60:], y[60:], shots=(2,), seeds=(3,))
    assert a == b and a["2-shot_std"] == 0.0


def test_few_shot_label_ids_need_not_be_contiguous() -> None:
    full, full_y = clusters(10, num_classes=3)
    ids = torch.tensor([7, 42, 100])[full_y]
    out = few_shot_accuracy(full[::2], ids[::2], full[1::2], ids[1::2], shots=(2,), seeds=(0,))
    assert out["2-shot"] > 95.0


def test_few_shot_errors() -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 4  # 5 rows per class
    with pytest.raises(ValueError, match="fewer than 8 training rows"):
        few_shot_accuracy(x, y, x, y, shots=(8,))
    with pytest.raises(ValueError, match="no training row"):
        few_shot_accuracy(x, y, x[:2], torch.tensor([0, 9]), shots=(1,))
    with pytest.raises(ValueError, match="method"):
        few_shot_accuracy(x, y, x, y, shots=(1,), method="knn")  # type: ignore[arg-type]


def test_labels_given_as_a_list_name_the_conversion() -> None:
    """check_labels refuses a list with a TypeError, but its callers called .to(device) on it first: AttributeError."""
    x, y = torch.randn(20, 4), torch.arange(20) % 4
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor .*torch.as_tensor\(labels\)"):
        zero_shot_accuracy(torch.randn(2, 6), E[:3], [0, 1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"train_labels must be a torch.Tensor .*torch.as_tensor"):
        few_shot_accuracy(x, y.tolist(), x, y, shots=(1,))  # type: ignore[arg-type]
