"""Retrieval recall on hand-made similarity matrices (big_vision style) and against a naive loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from csaligner.eval import recall_at_k, retrieval_metrics

FromSim = Callable[[Tensor], tuple[Tensor, Tensor]]

# 5 texts x 3 images; texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2.
SIM = torch.tensor(
    [
        [0.5, 0.1, 0.2],  # t0 -> img0 first: rank 0
        [0.1, 0.4, 0.2],  # t1 -> img0 behind 0.4 and 0.2: rank 2
        [0.3, 0.2, 0.1],  # t2 -> img1 behind 0.3: rank 1
        [0.2, 0.3, 0.1],  # t3 -> img2 last: rank 2
        [0.1, 0.1, 0.45],  # t4 -> img2 first: rank 0
    ]
)
T2I = torch.tensor([0, 0, 1, 2, 2])


def naive_ranks(image: Tensor, text: Tensor, t2i: Tensor, pessimistic: bool = True) -> tuple[list[int], list[int]]:
    """Reference: full matrix, one query at a time, plain Python comparisons."""
    sim = torch.nn.functional.normalize(image.double(), dim=1) @ torch.nn.functional.normalize(text.double(), dim=1).T
    before = (lambda a, b: a >= b) if pessimistic else (lambda a, b: a > b)
    i2t = []
    for i in range(image.shape[0]):
        pos = [j for j in range(text.shape[0]) if int(t2i[j]) == i]
        if not pos:
            continue
        best = max(float(sim[i, j]) for j in pos)
        i2t.append(sum(before(float(sim[i, j]), best) for j in range(text.shape[0]) if j not in pos))
    t2i_ranks = []
    for j in range(text.shape[0]):
        target = int(t2i[j])
        if target < 0:
            continue
        score = float(sim[target, j])
        t2i_ranks.append(sum(before(float(sim[i, j]), score) for i in range(image.shape[0]) if i != target))
    return i2t, t2i_ranks


def test_hand_made_matrix_both_directions(from_similarity: FromSim) -> None:
    image, text = from_similarity(SIM)
    out = retrieval_metrics(image, text, T2I, ks=(1, 2, 3))
    # Text queries: ranks [0, 2, 1, 2, 0].
    assert out["t2i_R@1"] == pytest.approx(40.0)
    assert out["t2i_R@2"] == pytest.approx(60.0)
    assert out["t2i_R@3"] == pytest.approx(100.0)
    # Image queries: img0 best caption t0 first; img1's caption behind t1 and t3 (rank 2);
    # img2's caption t3 is poor but t4 is first, and ANY caption counts (rank 0).
    assert out["i2t_R@1"] == pytest.approx(200 / 3)
    assert out["i2t_R@2"] == pytest.approx(200 / 3)
    assert out["i2t_R@3"] == pytest.approx(100.0)
    assert out["rsum"] == pytest.approx(40 + 60 + 100 + 200 / 3 + 200 / 3 + 100)
    assert list(out) == ["i2t_R@1", "i2t_R@2", "i2t_R@3", "t2i_R@1", "t2i_R@2", "t2i_R@3", "rsum"]


def test_default_keys_and_scale_invariance(from_similarity: FromSim) -> None:
    image, text = from_similarity(SIM)
    out = retrieval_metrics(image, text, T2I)
    assert list(out) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    scaled = retrieval_metrics(3.0 * image, 0.2 * text.float(), T2I)
    assert scaled == pytest.approx(out)


def test_ties_pessimistic_and_optimistic(from_similarity: FromSim) -> None:
    # t0 scores its image and the other image equally.
    image, text = from_similarity(torch.tensor([[0.3, 0.3], [0.1, 0.4]]))
    t2i = torch.tensor([0, 1])
    assert retrieval_metrics(image, text, t2i, ks=(1,))["t2i_R@1"] == pytest.approx(50.0)
    assert retrieval_metrics(image, text, t2i, ks=(1,), ties="optimistic")["t2i_R@1"] == pytest.approx(100.0)


def test_tied_captions_of_the_same_image_do_not_hurt(from_similarity: FromSim) -> None:
    image, text = from_similarity(torch.tensor([[0.3, 0.1], [0.3, 0.1], [0.2, 0.35]]))
    out = retrieval_metrics(image, text, torch.tensor([0, 0, 1]), ks=(1,))
    assert out["i2t_R@1"] == pytest.approx(100.0)


def test_collapsed_embeddings_get_no_credit() -> None:
    image, text = torch.ones(4, 8), torch.ones(4, 8)
    t2i = torch.arange(4)
    out = retrieval_metrics(image, text, t2i, ks=(1, 4))
    assert out["t2i_R@1"] == 0.0 and out["i2t_R@1"] == 0.0
    assert out["t2i_R@4"] == 100.0  # every other image is ahead: rank 3 < 4
    assert retrieval_metrics(image, text, t2i, ks=(1,), ties="optimistic")["t2i_R@1"] == 100.0


def test_unpaired_text_is_a_distractor_not_a_query(from_similarity: FromSim) -> None:
    image, text = from_similarity(torch.tensor([[0.5, 0.1], [0.1, 0.5], [0.6, 0.0]]))
    out = retrieval_metrics(image, text, torch.tensor([0, 1, -1]), ks=(1,))
    assert out["i2t_R@1"] == pytest.approx(50.0)  # the distractor beats img0's caption
    assert out["t2i_R@1"] == pytest.approx(100.0)  # two text queries, both right


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_chunked_equals_unchunked_and_naive(ties: str) -> None:
    n, m, d = 37, 120, 16
    image = torch.randn(n, d)
    t2i = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,))])[torch.randperm(m)]
    text = image[t2i] + 1.5 * torch.randn(m, d)  # noisy captions: recall strictly between 0 and 100
    full = retrieval_metrics(image, text, t2i, ks=(1, 5, 10), chunk_size=10_000, ties=ties)  # type: ignore[arg-type]
    for chunk in (1, 7, 36):
        assert retrieval_metrics(image, text, t2i, chunk_size=chunk, ties=ties) == full  # type: ignore[arg-type]
    i2t_ranks, t2i_ranks = naive_ranks(image, text, t2i, pessimistic=ties == "pessimistic")
    for k in (1, 5, 10):
        assert full[f"i2t_R@{k}"] == pytest.approx(100 * sum(r < k for r in i2t_ranks) / n)
        assert full[f"t2i_R@{k}"] == pytest.approx(100 * sum(r < k for r in t2i_ranks) / m)
    assert 0 < full["t2i_R@1"] < 100


def test_recall_at_k() -> None:
    assert recall_at_k(torch.tensor([0, 1, 2, 5]), 2) == 50.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"text_to_image": torch.tensor([0, 0, 1, 2, 3])}, r"\[0, 2\]"),
        ({"text_to_image": torch.tensor([0.0, 0, 1, 2, 2])}, "integer"),
        ({"text_to_image": torch.tensor([0, 1, 2])}, r"shape \(5,\)"),
        ({"text_to_image": -torch.ones(5, dtype=torch.long)}, "every text"),
        ({"ks": (0,)}, "ks must"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ties": "random"}, "ties"),
    ],
)
def test_errors_name_the_problem(kwargs: dict, match: str, from_similarity: FromSim) -> None:
    image, text = from_similarity(SIM)
    args = {"image_emb": image, "text_emb": text, "text_to_image": T2I, **kwargs}
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args)


def test_dimension_mismatch() -> None:
    with pytest.raises(ValueError, match="feature dims differ"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3))


def test_a_list_index_map_names_the_conversion() -> None:
    """check_index refuses a list with a TypeError, but every caller called .to(device) on it first: AttributeError."""
    from csaligner.eval import modality_gap_metrics, t2i_metrics

    image, text = torch.randn(3, 4), torch.randn(5, 4)
    t2i = [0, 0, 1, 2, 2]
    for metric in (retrieval_metrics, modality_gap_metrics, t2i_metrics):
        with pytest.raises(TypeError, match=r"text_to_image must be a torch.Tensor .*torch.as_tensor"):
            metric(image, text, t2i)  # type: ignore[operator]


def test_an_ambient_autocast_does_not_tie_close_scores() -> None:
    """Under bf16 autocast the scores were rounded to 8 bits: a positive at cosine 0.9990 tied a negative at 0.9985,
    and the pessimistic tie rule ranked it second (R@1 0 instead of 100), as an eval loop inside autocast does."""
    import math

    from csaligner.eval import zero_shot_accuracy

    def unit(angle: float) -> list[float]:
        return [math.cos(angle), math.sin(angle)]

    image = torch.tensor([unit(0.0)])
    text = torch.tensor([unit(math.acos(0.9990)), unit(-math.acos(0.9985))])  # the caption, then a distractor
    t2i = torch.tensor([0, -1])
    plain = retrieval_metrics(image, text, t2i, ks=(1,))
    assert plain["i2t_R@1"] == 100.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert retrieval_metrics(image, text, t2i, ks=(1,)) == plain
        assert zero_shot_accuracy(image, text[:, None], torch.tensor([0]))["top1"] == 100.0
