"""Tiny randomly initialised unCLIP decoders (diffusers' get_dummy_components approach) and tiny image files.

Building one takes ~0.1 s and a 2-step 64x64 generation well under a second on CPU; diffusers itself is
slow to import (~7 s), so every diffusers-dependent fixture imports it lazily and is skipped without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

EMBED_DIM = 32  # image-embedding width of the tiny decoders; tests read it back with decoder_embed_dim


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny convolutions gain nothing from threads, and on shared CPUs two threads ran them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_kandinsky() -> Any:
    """KandinskyV22Pipeline: image-conditioned UNet (addition_embed_type="image") + tiny MoVQ + DDPM."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and learned variance
        addition_embed_type="image",
        encoder_hid_dim=EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    torch.manual_seed(0)
    movq = diffusers.VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    # DDPM draws fresh noise at every step, so seeding is exercised beyond the initial latents
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, variance_type="learned_range"
    )
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_tokenizer() -> Any:
    """A character-level CLIPTokenizer built in memory (diffusers' tests download one; we have no network)."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)


def tiny_karlo() -> Any:
    """UnCLIPImageVariationPipeline: tiny CLIP text/image encoders, text_proj, 32px decoder, 64px super-res."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from csaligner.decode.unclip import _text_proj_class

    tokenizer = tiny_clip_tokenizer()
    common = {"hidden_size": EMBED_DIM, "projection_dim": EMBED_DIM, "intermediate_size": 37, "num_attention_heads": 4}
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=8,
            num_hidden_layers=2,
            **common,
        )
    )
    torch.manual_seed(0)
    image_encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, **common)
    )
    torch.manual_seed(0)
    text_proj = _text_proj_class()(clip_embeddings_dim=EMBED_DIM, time_embed_dim=128, cross_attention_dim=100)
    torch.manual_seed(0)
    decoder = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=100,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    super_res = {
        "sample_size": 64,
        "layers_per_block": 1,
        "down_block_types": ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        "block_out_channels": (32, 64),
        "in_channels": 6,
        "out_channels": 3,
    }
    torch.manual_seed(0)
    super_res_first = diffusers.UNet2DModel(**super_res)
    torch.manual_seed(1)
    super_res_last = diffusers.UNet2DModel(**super_res)
    pipe = diffusers.UnCLIPImageVariationPipeline(
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_proj=text_proj,
        feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder,
        super_res_first=super_res_first,
        super_res_last=super_res_last,
        decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", num_train_timesteps=1000),
        super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", num_train_timesteps=1000),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def kandinsky_pipe() -> Any:
    return tiny_kandinsky()


@pytest.fixture(scope="session")
def karlo_pipe() -> Any:
    return tiny_karlo()


@pytest.fixture(scope="session")
def kandinsky_dir(tmp_path_factory: pytest.TempPathFactory, kandinsky_pipe: Any) -> Path:
    """A tiny Kandinsky 2.2 decoder saved as a local folder, laid out like the hub's."""
    path = tmp_path_factory.mktemp("kandinsky22")
    kandinsky_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def karlo_dir(tmp_path_factory: pytest.TempPathFactory, karlo_pipe: Any) -> Path:
    path = tmp_path_factory.mktemp("karlo")
    karlo_pipe.save_pretrained(path)
    return path


@pytest.fixture
def write_images() -> Any:
    """`write_images(folder, n, seed, size=32, kind="smooth")` writes n small RGB PNGs and returns their paths."""
    return _write_images


def _write_images(folder: Path, n: int, seed: int, size: int = 32, kind: str = "smooth") -> list[Path]:
    """Write n small RGB PNGs: "smooth" gradients with random colours, or "noise"."""
    Image = pytest.importorskip("PIL.Image")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    paths = []
    for i in range(n):
        if kind == "noise":
            pixels = rng.integers(0, 256, (size, size, 3))
        else:
            colour = rng.uniform(0.2, 0.8, 3)[None, None, :]
            pixels = np.broadcast_to(255 * colour * (0.5 + 0.5 * ramp), (size, size, 3))
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths
