"""Shared fixtures for the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.eval.tiny_runs import TinyCaches, class_caches, tiny_caches
from torch import Tensor


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Seed every test; run it on one intra-op thread (restored after).

    These tests use tiny tensors: on shared CI cores, intra-op threads only add barrier waits
    (measured: 0.6 ms vs 20-70 ms per small forward/backward with 2 threads under load).
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> TinyCaches:
    """Tiny image and text feature caches (pooled and token text), built once per test module."""
    return tiny_caches(tmp_path_factory.mktemp("caches"))


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny (train, test) class-folder caches (daisy, roses, tulips), built once per test module."""
    return class_caches(tmp_path_factory.mktemp("classes"))


@pytest.fixture
def zero_shot_prompts(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """The (C, P, D) class prompt embeddings each zero-shot call in `csaligner.eval.evaluate` receives."""
    import csaligner.eval.evaluate as evaluate_module

    seen: list[Tensor] = []
    real = evaluate_module.zero_shot_accuracy

    def spy(test_emb: Tensor, class_text: Tensor, labels: Tensor) -> Any:
        seen.append(class_text)
        return real(test_emb, class_text, labels)

    monkeypatch.setattr(evaluate_module, "zero_shot_accuracy", spy)
    return seen


def _embeddings_from_similarity(sim: Tensor) -> tuple[Tensor, Tensor]:
    """Image and text embeddings whose cosine similarity matrix is exactly `sim` (M texts x N images).

    Images are one-hot rows e_i in N + 1 dims; text j is [sim_j1, ..., sim_jN, r_j] with r_j making
    it unit norm, so cos(image_i, text_j) = sim_ji. Rows of `sim` need squared norm <= 1.
    """
    sim = sim.double()
    n = sim.shape[1]
    rest = (1.0 - sim.pow(2).sum(1)).clamp_min(0).sqrt()
    assert bool((sim.pow(2).sum(1) <= 1).all()), "rows of sim must have norm <= 1"
    image = torch.eye(n, n + 1, dtype=torch.float64)
    text = torch.cat([sim, rest.unsqueeze(1)], dim=1)
    return image, text


@pytest.fixture
def from_similarity() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """`from_similarity(sim)` -> (image, text) embeddings with cosine(image_i, text_j) == sim[j, i]."""
    return _embeddings_from_similarity
