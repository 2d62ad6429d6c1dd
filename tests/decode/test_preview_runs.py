"""Retrieval preview and generate straight from trained runs: prompt tokens, run names, --run mode options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from csaligner.cli import main
from csaligner.data.cache import FeatureCache
from csaligner.encoders import get_encoder
from csaligner.train.model import load_adapters
from tests.eval.tiny_runs import TinyCaches, count_cache_json_reads, make_run, other_tiny_encoders, tiny_caches

PROMPTS = ["a dog runs", "red ball", "the cat"]  # short: one text line each at any thumbnail size


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> TinyCaches:
    return tiny_caches(tmp_path_factory.mktemp("caches"))


@pytest.fixture
def token_run(caches: TinyCaches, tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "tok", caches.text_tokens)


def token_conditioned_prompts(run: Path, text_encoder: str = "tiny-text") -> torch.Tensor:
    """(P, 12) what the run's text adapter gives the prompts encoded with tokens, as in training."""
    enc = get_encoder(text_encoder).encode_texts(PROMPTS, tokens=True)
    with torch.no_grad():
        return load_adapters(str(run)).text(enc.pooled, text_tokens=enc.tokens, text_token_mask=enc.mask)


def test_rank_runs_encodes_prompts_with_tokens(caches: TinyCaches, token_run: Path) -> None:
    from csaligner.decode.preview_runs import rank_runs

    images = FeatureCache.open(caches.image).pooled("image", torch.float32)
    scores, indices = rank_runs({"tok": token_run}, images, PROMPTS, k=4)
    with torch.no_grad():
        image_emb = F.normalize(load_adapters(str(token_run)).image(images), dim=-1)
    want = (F.normalize(token_conditioned_prompts(token_run), dim=-1) @ image_emb.T).topk(4, dim=-1)
    torch.testing.assert_close(scores["tok"], want.values)
    assert torch.equal(indices["tok"], want.indices)


def test_each_run_is_ranked_with_its_own_text_encoder(
    caches: TinyCaches, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs trained on different (same-width) text encoders: each run's prompts come from its own encoder."""
    import csaligner.decode.preview_runs as preview_runs

    trained_on = {"a": "tiny-text@seed0-b512-v1", "a2": "tiny-text@seed0-b512-v1", "b": "tiny-text-b@seed1-b512-v1"}
    runs = {n: make_run(tmp_path / n, caches.text_tokens, encoders={"text_encoder": e}) for n, e in trained_on.items()}
    images = FeatureCache.open(caches.image).pooled("image", torch.float32)
    encoded_with: list[str] = []
    real = preview_runs.encode_prompts

    def spy(prompts: list[str], text_encoder: str, *, tokens: bool = False, expect_id: str | None = None) -> object:
        encoded_with.append(text_encoder)
        return real(prompts, text_encoder, tokens=tokens, expect_id=expect_id)

    monkeypatch.setattr(preview_runs, "encode_prompts", spy)
    with other_tiny_encoders():
        scores, _ = preview_runs.rank_runs(runs, images, PROMPTS, k=4)
        for name, encoder in (("a", "tiny-text"), ("a2", "tiny-text"), ("b", "tiny-text-b")):
            with torch.no_grad():
                image_emb = F.normalize(load_adapters(str(runs[name])).image(images), dim=-1)
            text_emb = F.normalize(token_conditioned_prompts(runs[name], encoder), dim=-1)
            torch.testing.assert_close(scores[name], (text_emb @ image_emb.T).topk(4, dim=-1).values)
    assert encoded_with == ["tiny-text", "tiny-text-b"]  # once per distinct encoder, not once per run


def test_rank_runs_refuses_prompt_features_without_tokens(caches: TinyCaches, token_run: Path) -> None:
    from csaligner.decode.preview_runs import rank_runs

    images = FeatureCache.open(caches.image).pooled("image", torch.float32)
    pooled = get_encoder("tiny-text").encode_texts(PROMPTS).pooled
    with pytest.raises(ValueError, match=r"trained with text tokens.*pass prompt_tokens"):
        rank_runs({"tok": token_run}, images, PROMPTS, 2, pooled)


def test_generate_maps_prompts_with_tokens(token_run: Path) -> None:
    from csaligner.decode.cli import run_embeddings

    torch.testing.assert_close(run_embeddings(token_run, PROMPTS), token_conditioned_prompts(token_run))


def preview(caches: TinyCaches, tmp_path: Path, out: Path, *args: str) -> int:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    base = ["preview", "--image-cache", str(caches.image), "--prompts", str(tmp_path / "prompts.txt"), "-k", "2"]
    return main([*base, "--out", str(out), *args])


def test_preview_run_mode_honours_thumb_size_ground_truth_and_writes_json(
    caches: TinyCaches, token_run: Path, tmp_path: Path
) -> None:
    from PIL import Image

    gt = {"0": caches.image_ids, "2": [str(caches.image_paths[3]), 5]}  # by image id, by path, by row
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    run = ["--run", f"T={token_run}"]
    assert preview(caches, tmp_path, tmp_path / "big", *run) == 0
    options = ["--thumb-size", "32", "--ground-truth", str(tmp_path / "gt.json")]
    assert preview(caches, tmp_path, tmp_path / "small", *run, *options) == 0
    big, small = (Image.open(tmp_path / d / "preview.png").size for d in ("big", "small"))
    assert big[1] - small[1] == len(PROMPTS) * (128 - 32)  # one thumbnail row per prompt
    record = json.loads((tmp_path / "small" / "preview.json").read_text())
    assert record["prompts"] == PROMPTS and record["k"] == 2
    indices = record["settings"]["T"]["indices"]
    assert len(indices) == len(PROMPTS) and all(len(row) == 2 for row in indices)
    hits = 1 + int(bool({3, 5} & set(indices[2])))  # prompt 0 names every image
    assert f"T (hit@2: {hits}/3)" in (tmp_path / "small" / "preview.html").read_text()
    assert "hit@" not in (tmp_path / "big" / "preview.html").read_text()


def test_preview_run_mode_reads_the_image_cache_once(
    caches: TinyCaches, token_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its encoder id, features and image names all come from one opened cache."""
    (tmp_path / "gt.json").write_text(json.dumps({"0": caches.image_ids[:1]}))
    reads = count_cache_json_reads(monkeypatch)
    gt = ["--ground-truth", str(tmp_path / "gt.json")]
    assert preview(caches, tmp_path, tmp_path / "o", "--run", str(token_run), *gt) == 0
    assert reads[caches.image.resolve()] == 1


def test_preview_run_mode_errors(
    caches: TinyCaches, token_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["--run", str(token_run)]
    other = tmp_path / "other" / "tok"
    shutil.copytree(token_run, other)
    assert preview(caches, tmp_path, tmp_path / "o", "--run", str(token_run), "--run", str(other)) == 1
    assert "two runs are named 'tok'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert preview(caches, tmp_path, tmp_path / "o", "--run", str(token_run), "--image-list", "x.txt") == 1
    assert "--image-list belongs to the --text-embeds mode" in capsys.readouterr().err
    (tmp_path / "gt.json").write_text(json.dumps({"0": ["nope.png"]}))
    assert preview(caches, tmp_path, tmp_path / "o", *run, "--ground-truth", str(tmp_path / "gt.json")) == 1
    assert "prompt 0 names 'nope.png', which is not among the images" in capsys.readouterr().err


def test_preview_refuses_an_image_cache_from_another_image_encoder(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "b", caches.text_tokens, encoders={"image_encoder": "tiny-image-b@seed1-v1"})
    assert preview(caches, tmp_path, tmp_path / "o", "--run", str(run)) == 1  # the cache is tiny-image's
    err = capsys.readouterr().err
    assert "trained on image features from 'tiny-image-b@seed1-v1', but the preview image cache" in err
    assert not (tmp_path / "o").exists()
