"""load_decoder / generate on tiny random Kandinsky 2.2 and Karlo decoders (CPU, 2 steps, 64x64)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csaligner.decode import generate, load_decoder, mean_embed_norm, rescale_embeds, zero_image_embeds
from csaligner.decode.unclip import DECODERS, decoder_embed_dim, load_image_encoder

pytest.importorskip("diffusers")

EMBED_DIM = 32  # the tiny decoders' embedding width (conftest.EMBED_DIM); checked in test_tiny_decoder_dims

FAST = {"num_inference_steps": 2, "guidance_scale": 7.5}


def pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_tiny_decoder_dims(kandinsky_pipe: Any, karlo_pipe: Any) -> None:
    assert decoder_embed_dim(kandinsky_pipe) == decoder_embed_dim(karlo_pipe) == EMBED_DIM


def test_kandinsky_shapes_and_seed_determinism(kandinsky_pipe: Any) -> None:
    emb = torch.randn(2, EMBED_DIM)
    a = generate(kandinsky_pipe, emb, seed=3, height=64, width=32, **FAST)
    b = generate(kandinsky_pipe, emb, seed=3, height=64, width=32, **FAST)
    assert [im.size for im in a] == [(32, 64), (32, 64)]  # PIL size is (width, height)
    assert all(im.mode == "RGB" for im in a)
    np.testing.assert_array_equal(pixels(a), pixels(b))
    assert pixels(a).std() > 1  # not a blank image
    c = generate(kandinsky_pipe, emb, seed=4, height=64, width=32, **FAST)
    assert np.abs(pixels(a) - pixels(c)).mean() > 1


def test_kandinsky_embedding_changes_image(kandinsky_pipe: Any) -> None:
    emb = torch.randn(1, EMBED_DIM)
    base = pixels(generate(kandinsky_pipe, emb, height=32, width=32, **FAST))
    other = pixels(generate(kandinsky_pipe, -emb, height=32, width=32, **FAST))
    assert np.abs(base - other).mean() > 1


def test_kandinsky_row_does_not_depend_on_batch(kandinsky_pipe: Any) -> None:
    """Each row has its own generator, so a run can be split into batches or resumed."""
    emb = torch.randn(3, EMBED_DIM)
    together = pixels(generate(kandinsky_pipe, emb, height=32, width=32, batch_size=3, **FAST))
    alone = pixels(generate(kandinsky_pipe, emb[2:], seed=[2], height=32, width=32, **FAST))
    assert np.abs(together[2] - alone[0]).max() <= 2  # batched CPU kernels may differ in the last bit


def test_kandinsky_negative_embeds(kandinsky_pipe: Any) -> None:
    emb = torch.randn(2, EMBED_DIM)
    zeros = pixels(generate(kandinsky_pipe, emb, height=32, width=32, **FAST))
    explicit_zeros = generate(
        kandinsky_pipe, emb, negative_embeds=torch.zeros(1, EMBED_DIM), height=32, width=32, **FAST
    )
    np.testing.assert_array_equal(zeros, pixels(explicit_zeros))
    other = generate(kandinsky_pipe, emb, negative_embeds=torch.randn(2, EMBED_DIM), height=32, width=32, **FAST)
    assert np.abs(zeros - pixels(other)).mean() > 1
    with pytest.raises(ValueError, match=r"negative_embeds must have shape \(1, 32\) or \(2, 32\)"):
        generate(kandinsky_pipe, emb, negative_embeds=torch.zeros(3, EMBED_DIM), height=32, width=32, **FAST)


def test_embed_norm_rescales_before_decoding(kandinsky_pipe: Any) -> None:
    emb = torch.randn(1, EMBED_DIM)
    unit = emb / emb.norm()
    via_option = generate(kandinsky_pipe, unit, embed_norm=float(emb.norm()), height=32, width=32, **FAST)
    direct = generate(kandinsky_pipe, emb, height=32, width=32, **FAST)
    assert np.abs(pixels(via_option) - pixels(direct)).max() <= 1
    scaled = rescale_embeds(torch.randn(5, 8), 3.0)
    torch.testing.assert_close(scaled.norm(dim=-1), torch.full((5,), 3.0))
    assert mean_embed_norm(scaled) == pytest.approx(3.0)


def test_generate_rejects_bad_inputs(kandinsky_pipe: Any) -> None:
    with pytest.raises(ValueError, match="D=7, but this kandinsky22 decoder is conditioned on D=32"):
        generate(kandinsky_pipe, torch.randn(1, 7), height=32, width=32, **FAST)
    with pytest.raises(ValueError, match="multiples of 4"):
        generate(kandinsky_pipe, torch.randn(1, EMBED_DIM), height=62, width=64, **FAST)
    with pytest.raises(ValueError, match="2 seeds for 1 embeddings"):
        generate(kandinsky_pipe, torch.randn(1, EMBED_DIM), seed=[0, 1], height=32, width=32, **FAST)
    with pytest.raises(ValueError, match="NaN or Inf"):
        generate(kandinsky_pipe, torch.full((1, EMBED_DIM), float("nan")), height=32, width=32, **FAST)
    with pytest.raises(ValueError, match="unsupported pipeline"):
        generate(object(), torch.randn(1, EMBED_DIM))


def test_generate_settings_are_checked_and_a_numpy_seed_is_a_seed(kandinsky_pipe: Any) -> None:
    """A numpy seed was a TypeError ('numpy.int64' object is not iterable); NaN guidance and 2.7 steps went to
    the pipeline unchecked; embed_norm=0 was reported as "norm"."""
    e = torch.randn(2, EMBED_DIM)
    size = {"height": 32, "width": 32}
    by_int = pixels(generate(kandinsky_pipe, e, seed=3, **size, **FAST))
    np.testing.assert_array_equal(pixels(generate(kandinsky_pipe, e, seed=np.int64(3), **size, **FAST)), by_int)
    np.testing.assert_array_equal(pixels(generate(kandinsky_pipe, e, seed=np.arange(3, 5), **size, **FAST)), by_int)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"seed": 2.5}, "seed must be an integer or one integer per row, got 2.5"),
        ({"seed": [0, True]}, r"seed must be an integer or one integer per row, got \[0, True\]"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"num_inference_steps": 2.7}, "num_inference_steps must be an integer >= 1, got 2.7"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"embed_norm": 0.0}, "embed_norm must be a finite number > 0, got 0.0"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            generate(kandinsky_pipe, e, **size, **{**FAST, **kwargs})


def test_karlo_image_embeddings_path(karlo_pipe: Any) -> None:
    emb = torch.randn(2, EMBED_DIM)
    run = {"num_inference_steps": 2, "super_res_steps": 2, "guidance_scale": 7.5}
    a = generate(karlo_pipe, emb, seed=1, **run)
    b = generate(karlo_pipe, emb, seed=1, **run)
    assert [im.size for im in a] == [(64, 64), (64, 64)]  # fixed by the super-res UNet's sample_size
    np.testing.assert_array_equal(pixels(a), pixels(b))
    c = generate(karlo_pipe, -emb, seed=1, **run)
    assert np.abs(pixels(a) - pixels(c)).mean() > 1
    with pytest.raises(ValueError, match="karlo guides with its learned unconditional embedding"):
        generate(karlo_pipe, emb, negative_embeds=torch.zeros(1, EMBED_DIM), **run)
    with pytest.raises(ValueError, match="karlo always outputs 64x64"):
        generate(karlo_pipe, emb, height=128, **run)


def test_karlo_matches_the_pipeline_fed_directly(karlo_pipe: Any) -> None:
    """generate is thin plumbing: same result as calling UnCLIPImageVariationPipeline(image_embeddings=...)."""
    emb = torch.randn(1, EMBED_DIM)
    ours = generate(karlo_pipe, emb, seed=5, num_inference_steps=2, super_res_steps=2, guidance_scale=4.0)
    theirs = karlo_pipe(
        image_embeddings=emb,
        decoder_num_inference_steps=2,
        super_res_num_inference_steps=2,
        decoder_guidance_scale=4.0,
        generator=torch.Generator().manual_seed(5),
    ).images
    np.testing.assert_array_equal(pixels(ours), pixels(theirs))


@pytest.mark.parametrize("kind", ["kandinsky22", "karlo"])
def test_load_decoder_round_trip(
    kind: str, kandinsky_dir: Path, karlo_dir: Path, kandinsky_pipe: Any, karlo_pipe: Any
) -> None:
    folder, original = (kandinsky_dir, kandinsky_pipe) if kind == "kandinsky22" else (karlo_dir, karlo_pipe)
    pipe = load_decoder(kind, folder, device="cpu", dtype=torch.float32)
    assert type(pipe) is type(original)
    emb = torch.randn(1, EMBED_DIM)
    run: dict[str, Any] = {"num_inference_steps": 2, "guidance_scale": 3.0}
    if kind == "kandinsky22":
        run.update(height=32, width=32)
    else:
        run.update(super_res_steps=2)
    for name, component in original.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                assert torch.equal(getattr(pipe, name).state_dict()[key], value), f"{name}.{key} changed"
    # same weights; a freshly allocated copy may take another CPU kernel path, so allow stray last-bit flips
    diff = np.abs(pixels(generate(pipe, emb, **run)) - pixels(generate(original, emb, **run)))
    assert diff.mean() < 0.05 and diff.max() <= 3


def test_load_decoder_errors_name_the_weights(tmp_path: Path, kandinsky_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"kandinsky-community/kandinsky-2-2-decoder.*--decoder-path"):
        load_decoder("kandinsky22", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="kakaobrain/karlo-v1-alpha-image-variations"):
        load_decoder("karlo", tmp_path)
    with pytest.raises(ValueError, match="holds a KandinskyV22Pipeline pipeline, but decoder 'karlo' needs"):
        load_decoder("karlo", kandinsky_dir)
    with pytest.raises(ValueError, match=r"unknown decoder 'dalle2'; choose one of \['kandinsky22', 'karlo'\]"):
        load_decoder("dalle2", kandinsky_dir)
    index = json.loads((kandinsky_dir / "model_index.json").read_text())
    assert index["_class_name"] == DECODERS["kandinsky22"].pipeline


def test_zero_image_embeds_from_a_local_encoder(tmp_path: Path, karlo_pipe: Any) -> None:
    karlo_pipe.image_encoder.save_pretrained(tmp_path / "image_encoder")
    encoder = load_image_encoder(tmp_path / "image_encoder")
    neg = zero_image_embeds(encoder, batch_size=3)
    assert neg.shape == (3, EMBED_DIM)
    with torch.no_grad():
        expected = karlo_pipe.image_encoder(torch.zeros(1, 3, 32, 32)).image_embeds
    torch.testing.assert_close(neg, expected.expand(3, -1))
    with pytest.raises(FileNotFoundError, match="kandinsky-2-2-prior"):
        load_image_encoder(tmp_path / "nothing")
