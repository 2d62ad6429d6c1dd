"""Aligned embeddings -> images with a pretrained unCLIP decoder, no diffusion prior.

A CS-Aligner text adapter maps text features into a CLIP image-embedding space; an unCLIP decoder
trained on that space renders them directly, replacing the diffusion prior (the paper uses the
Kandinsky 2.2 decoder and Karlo). Weights are read from a local folder only: nothing is downloaded.

Embedding scale: the decoders were trained on raw CLIP image embeddings, which are not unit norm,
while aligned embeddings are often L2-normalised. `embed_norm` rescales every row to a given norm;
measure it on real image embeddings from the decoder's own CLIP image encoder (`mean_embed_norm`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from csaligner._validation import check_features, check_positive, is_integer, is_number
from csaligner.decode._deps import require
from csaligner.encoders.hf_quiet import silence_imported_hf_libraries

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class DecoderSpec:
    """How to find, load and drive one unCLIP decoder family.

    Attributes:
        pipeline: diffusers pipeline class name.
        hub_id: Hugging Face repository holding the released weights (download it elsewhere).
        image_space: the CLIP image encoder whose embedding space the decoder was trained on.
        embed_dim: embedding width of the released weights (tiny test decoders differ).
        default_size: output side in pixels of the released weights.
    """

    pipeline: str
    hub_id: str
    image_space: str
    embed_dim: int
    default_size: int


DECODERS: dict[str, DecoderSpec] = {
    "kandinsky22": DecoderSpec(
        pipeline="KandinskyV22Pipeline",
        hub_id="kandinsky-community/kandinsky-2-2-decoder",
        image_space="CLIP ViT-bigG/14 (image_encoder/ of kandinsky-community/kandinsky-2-2-prior)",
        embed_dim=1280,
        default_size=512,
    ),
    "karlo": DecoderSpec(
        pipeline="UnCLIPImageVariationPipeline",
        hub_id="kakaobrain/karlo-v1-alpha-image-variations",
        image_space="OpenAI CLIP ViT-L/14",
        embed_dim=768,
        default_size=256,
    ),
}


def _spec(kind: str) -> DecoderSpec:
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {sorted(DECODERS)}")
    return DECODERS[kind]


def _download_hint(spec: DecoderSpec) -> str:
    return (
        f"download the '{spec.hub_id}' folder on a machine with network access "
        f"(e.g. `huggingface-cli download {spec.hub_id} --local-dir DIR`), copy it here and pass DIR as the path "
        "(--decoder-path DIR on the command line)"
    )


def check_decoder_folder(kind: str, path: str | Path) -> Path:
    """Check, without loading anything, that `path` holds a saved pipeline of decoder `kind`.

    Cheap, so callers run it before any slow step (a text encoder, the pipeline itself).

    Raises:
        FileNotFoundError: no model_index.json in `path` (the message says how to get the weights).
        ValueError: an unknown `kind`, or `path` holds another diffusers pipeline.
    """
    spec = _spec(kind)
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no {kind} decoder weights at {path} (no model_index.json); {_download_hint(spec)}")
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{index} is not a diffusers model_index.json ({err}); {_download_hint(spec)}") from err
    if found != spec.pipeline:
        raise ValueError(
            f"{path} holds a {found} pipeline, but decoder {kind!r} needs a {spec.pipeline}; {_download_hint(spec)}"
        )
    return path


def load_decoder(
    kind: str, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """Load a diffusers unCLIP decoder pipeline from a local folder (never from the network).

    Args:
        kind: "kandinsky22" (KandinskyV22Pipeline) or "karlo" (UnCLIPImageVariationPipeline).
        path: folder holding the pipeline's model_index.json and component subfolders.
        device: where to put the pipeline.
        dtype: weight dtype, e.g. torch.float16 on GPU.

    Returns:
        The diffusers pipeline, progress bars disabled.
    """
    spec = _spec(kind)
    path = check_decoder_folder(kind, path)
    diffusers = require("diffusers", "load_decoder")
    silence_imported_hf_libraries()  # inside `csalign generate`: no "Loading pipeline components" bars
    if kind == "karlo":
        pipe = _load_karlo(path, dtype)
    else:
        cls = getattr(diffusers, spec.pipeline)
        pipe = cls.from_pretrained(path, local_files_only=True, **_dtype_kwarg("diffusers", dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype_kwarg(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` in current diffusers/transformers, `torch_dtype` in older ones.

    Loading in the target dtype (not casting afterwards) keeps the modules a model pins to float32.
    """
    from packaging.version import Version

    if library == "diffusers":
        import diffusers

        new = Version(diffusers.__version__).major >= 1
        try:
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  present since `dtype`

            new = True
        except ImportError:
            pass
    else:
        import transformers

        new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": dtype}


def _load_karlo(path: Path, dtype: torch.dtype) -> Any:
    """Assemble UnCLIPImageVariationPipeline component by component.

    Karlo's model_index.json names text_proj by a module path that moved when diffusers deprecated unCLIP,
    so DiffusionPipeline.from_pretrained cannot resolve (or even accept) it; every other component
    loads from its subfolder with its own class.
    """
    diffusers = require("diffusers", "load_decoder('karlo')")
    transformers = require("transformers", "load_decoder('karlo')")
    silence_imported_hf_libraries()
    components: dict[str, Any] = {}
    for name, entry in json.loads((path / "model_index.json").read_text()).items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, class_name = entry
        if class_name == "UnCLIPTextProjModel":
            cls = _text_proj_class()
        else:
            cls = getattr(transformers if library == "transformers" else diffusers, class_name)
        is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        kwargs = _dtype_kwarg(library, dtype) if is_model else {}
        components[name] = cls.from_pretrained(path / name, local_files_only=True, **kwargs)
    return diffusers.UnCLIPImageVariationPipeline(**components)


def _text_proj_class() -> Any:
    try:  # diffusers >= 0.33 moved unCLIP under pipelines.deprecated
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel  # type: ignore[no-redef]
    return UnCLIPTextProjModel


def decoder_kind(pipe: Any) -> str:
    """Name in DECODERS of a loaded pipeline's family."""
    diffusers = require("diffusers", "generate")
    for kind, spec in DECODERS.items():
        if isinstance(pipe, getattr(diffusers, spec.pipeline)):
            return kind
    supported = [s.pipeline for s in DECODERS.values()]
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; generate drives {supported} (see load_decoder)")


def decoder_embed_dim(pipe: Any) -> int:
    """Width D of the image embeddings the loaded decoder is conditioned on."""
    if decoder_kind(pipe) == "kandinsky22":
        return int(pipe.unet.config.encoder_hid_dim)
    return int(pipe.text_proj.config.clip_embeddings_dim)


def mean_embed_norm(image_embeds: Tensor) -> float:
    """Mean L2 norm of (N, D) real CLIP image embeddings: the scale a decoder was trained on."""
    check_features("image_embeds", image_embeds)
    return float(image_embeds.float().norm(dim=-1).mean())


def rescale_embeds(embeds: Tensor, norm: float) -> Tensor:
    """Rescale every row of (N, D) `embeds` to L2 norm `norm`, keeping its direction."""
    check_features("embeds", embeds)
    check_positive("norm", norm)
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load a CLIPVisionModelWithProjection from a local folder, for the zero-image negative embedding."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP image encoder at {path} (no config.json); for kandinsky22 it is the image_encoder/ "
            f"subfolder of kandinsky-community/kandinsky-2-2-prior, downloaded elsewhere"
        )
    transformers = require("transformers", "load_image_encoder")
    silence_imported_hf_libraries()
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    return encoder.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def zero_image_embeds(image_encoder: Any, batch_size: int = 1) -> Tensor:
    """(batch_size, D) embedding of an all-zero image: the Kandinsky 2.2 negative (as its prior's get_zero_embed)."""
    side = image_encoder.config.image_size
    param = next(image_encoder.parameters())
    zeros = torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype)
    return image_encoder(zeros).image_embeds.repeat(batch_size, 1)


def generate(
    pipe: Any,
    image_embeds: Tensor,
    *,
    negative_embeds: Tensor | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int | Sequence[int] = 0,
    height: int | None = None,
    width: int | None = None,
    embed_norm: float | None = None,
    batch_size: int = 8,
    super_res_steps: int = 7,
) -> list[Image.Image]:
    """Render (B, D) image-space embeddings with a loaded unCLIP decoder.

    Row i is drawn with its own generator seeded `seed + i` (or `seed[i]`), so an image does not depend
    on the batch it was drawn in: a 30K run can be split or resumed and stays reproducible.

    Args:
        pipe: a pipeline from `load_decoder`.
        image_embeds: (B, D) embeddings in the decoder's CLIP image space (e.g. adapted text embeddings).
        negative_embeds: Kandinsky 2.2 only: (1, D) or (B, D) negative for classifier-free guidance. Its prior
            uses the embedding of an all-zero image (`zero_image_embeds`); without an image encoder at hand,
            None uses the zero vector, which is not the same conditioning. Karlo guides with its own learned
            unconditional embedding and rejects this argument.
        guidance_scale: classifier-free guidance weight; <= 1 disables guidance.
        num_inference_steps: denoising steps (Karlo: decoder steps).
        seed: base seed, or one seed per row.
        height: output height; Kandinsky default 512 (a multiple of 64 for the released weights). Karlo's
            output size is fixed by its super-resolution UNet (256); pass None or that size.
        width: output width, as height.
        embed_norm: if set, rescale every row to this L2 norm first (see the module docstring).
        batch_size: rows per decoder call.
        super_res_steps: Karlo only: super-resolution denoising steps.

    Returns:
        B PIL images, in row order.
    """
    check_features("image_embeds", image_embeds)
    kind = decoder_kind(pipe)
    n, d = image_embeds.shape
    expected = decoder_embed_dim(pipe)
    if d != expected:
        raise ValueError(
            f"image_embeds has D={d}, but this {kind} decoder is conditioned on D={expected} embeddings "
            f"(released weights: {DECODERS[kind].image_space}); map the text into that space first"
        )
    _check_settings(num_inference_steps, batch_size, super_res_steps, guidance_scale, embed_norm)
    seeds = _row_seeds(seed, n)
    x = image_embeds.float() if embed_norm is None else rescale_embeds(image_embeds.float(), embed_norm)
    if kind == "kandinsky22":
        neg = _kandinsky_negatives(negative_embeds, n, d)
        h, w = _kandinsky_size(pipe, height, width)
    else:
        if negative_embeds is not None:
            raise ValueError("karlo guides with its learned unconditional embedding; pass negative_embeds=None")
        _check_karlo_size(pipe, height, width)
    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        generators = [torch.Generator().manual_seed(s) for s in seeds[rows]]
        if kind == "kandinsky22":
            out = pipe(
                image_embeds=_to_pipe(pipe.unet, x[rows]),
                negative_image_embeds=_to_pipe(pipe.unet, neg[rows]),
                height=h,
                width=w,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="pil",
            )
        else:
            out = pipe(
                image_embeddings=_to_pipe(pipe.decoder, x[rows]),
                decoder_num_inference_steps=num_inference_steps,
                super_res_num_inference_steps=super_res_steps,
                decoder_guidance_scale=guidance_scale,
                generator=generators,
                output_type="pil",
            )
        images.extend(out.images)
    return images


def _to_pipe(module: Any, x: Tensor) -> Tensor:
    return x.to(device=module.device, dtype=module.dtype)


def _seed_int(s: object) -> int:
    if isinstance(s, bool):
        raise TypeError("a bool is not a seed")
    return operator.index(cast(int, s))  # an int, a numpy integer or an integer 0-dim tensor


def _check_settings(
    steps: int, batch_size: int, super_res_steps: int, guidance_scale: float, embed_norm: float | None
) -> None:
    """Counts are positive integers (2.7 steps reached the pipeline as 2.7), the weights finite numbers (a NaN
    guidance scale was passed on to the pipeline, which decoded it without a word)."""
    counts = (("num_inference_steps", steps), ("batch_size", batch_size), ("super_res_steps", super_res_steps))
    for name, value in counts:
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not is_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (<= 1 disables guidance), got {guidance_scale!r}")
    if embed_norm is not None:
        check_positive("embed_norm", embed_norm)


def _row_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if is_integer(seed):  # numpy integers too (a seed drawn with np.random): iterating one was a TypeError
        return [operator.index(cast(int, seed)) + i for i in range(n)]
    try:
        seeds = [_seed_int(s) for s in cast(Sequence[int], seed)]
    except TypeError:  # a float, a bool, a string: not a seed, nor one per row
        raise ValueError(f"seed must be an integer or one integer per row, got {seed!r}") from None
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} embeddings; pass one seed per row or a single int")
    return seeds


def _kandinsky_negatives(negative_embeds: Tensor | None, n: int, d: int) -> Tensor:
    """(n, d) negatives: zeros when None, a (1, d) row broadcast, or (n, d) as given."""
    if negative_embeds is None:
        return torch.zeros(n, d)
    check_features("negative_embeds", negative_embeds)
    if negative_embeds.shape[1] != d or negative_embeds.shape[0] not in (1, n):
        raise ValueError(f"negative_embeds must have shape (1, {d}) or ({n}, {d}), got {tuple(negative_embeds.shape)}")
    return negative_embeds.float().expand(n, d)


def _kandinsky_size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    # the latent grid is side // factor**2 * factor, so other sides would silently round up
    multiple = pipe.movq_scale_factor**2
    h = height or DECODERS["kandinsky22"].default_size
    w = width or DECODERS["kandinsky22"].default_size
    if h % multiple or w % multiple or h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple} for this decoder, got {h}x{w}")
    return h, w


def _check_karlo_size(pipe: Any, height: int | None, width: int | None) -> None:
    size = int(pipe.super_res_first.config.sample_size)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value != size:
            raise ValueError(f"karlo always outputs {size}x{size} images; got {name}={value}; pass None or {size}")
