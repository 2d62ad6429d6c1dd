"""`csalign generate`: image-space embeddings -> PNGs with a local unCLIP decoder, plus a JSON manifest.

    csalign generate --decoder kandinsky22 --decoder-path DIR --embeddings E.safetensors \\
        --prompts prompts.txt --out OUT [--steps 50 --guidance 7.5 --seed 0]

Row i of the embeddings (key "image_embeds") is line i of the prompts file and becomes OUT/{i:06d}.png,
drawn with seed `seed + i`; rerunning with --skip-existing finishes an interrupted run identically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from csaligner._validation import check_device
from csaligner.decode._deps import MissingDependencyError
from csaligner.decode._io import DTYPES, load_tensor, parse_dtype, read_lines
from csaligner.decode.unclip import (
    DECODERS,
    check_decoder_folder,
    generate,
    load_decoder,
    load_image_encoder,
    mean_embed_norm,
    zero_image_embeds,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="render aligned embeddings into images with a local unCLIP decoder (Kandinsky 2.2, Karlo)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--decoder", required=True, choices=sorted(DECODERS), help="which unCLIP decoder --decoder-path holds"
    )
    p.add_argument("--decoder-path", required=True, type=Path, help="local folder of the decoder pipeline")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", type=Path, help="safetensors file with (N, D) 'image_embeds'")
    src.add_argument(
        "--run",
        type=Path,
        help="training run whose text adapter maps into the decoder's image-embedding space: prompts are "
        "encoded with the run's text encoder and mapped by its text adapter",
    )
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per embedding row")
    p.add_argument("--out", required=True, type=Path, help="output folder for PNGs and manifest.json")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="row i uses seed + i (default 0)")
    p.add_argument("--height", type=int, default=None, help="kandinsky22 only (default 512)")
    p.add_argument("--width", type=int, default=None, help="kandinsky22 only (default 512)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--embed-norm", type=float, default=None, help="rescale every embedding to this L2 norm")
    norm.add_argument(
        "--embed-norm-from",
        type=Path,
        default=None,
        help="safetensors with real CLIP 'image_embeds' of the decoder's encoder; use their mean norm",
    )
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negative-embeds", type=Path, help="kandinsky22: safetensors with 'negative_image_embeds'")
    neg.add_argument(
        "--image-encoder-path", type=Path, help="kandinsky22: CLIP image encoder folder for the zero-image negative"
    )
    p.add_argument("--super-res-steps", type=int, default=7, help="karlo only (default 7)")
    p.add_argument("--batch-size", type=int, default=4, help="images generated per pipeline call (default 4)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to run on (default cuda when available, else cpu)",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="decoder dtype (default float32)")
    p.add_argument("--skip-existing", action="store_true", help="keep PNGs already in --out (resume a run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from csaligner.encoders.hf_quiet import quiet_hf_libraries

    try:
        # No loading bars from the prompt encoder or the decoder pipeline (its denoising bars are off too, see
        # load_decoder); the libraries' warnings stay.
        with quiet_hf_libraries(logs=False):
            return _run(args)
    except MissingDependencyError as err:
        print(f"csalign generate: error: {err}", file=sys.stderr)
        return 1


def run_embeddings(run_dir: Path, prompts: list[str]) -> torch.Tensor:
    """(P, D_img) image-space embeddings of prompts: run's text encoder, then its text adapter (unnormalised).

    Prompts are encoded with token states when the run's text adapter reads them, as in training.
    """
    from csaligner.decode.preview_runs import encode_prompts, run_text_encoder, run_text_encoder_id
    from csaligner.train.embed import apply_text_adapter, text_adapter_reads_tokens
    from csaligner.train.model import load_adapters

    adapters = load_adapters(str(run_dir), "cpu")
    encoder = run_text_encoder(run_dir)
    tokens = text_adapter_reads_tokens(adapters)
    encoded = encode_prompts(prompts, encoder, tokens=tokens, expect_id=run_text_encoder_id(run_dir))
    fix = f"encode the prompts with {encoder!r} and tokens=True"
    return apply_text_adapter(adapters, run_dir, encoded.pooled, encoded.tokens, encoded.mask, fix=fix)


def _run(args: argparse.Namespace) -> int:
    # Cheap checks of the arguments first: --run loads a text encoder, and that should not be wasted.
    check_device("--device", args.device)
    check_decoder_folder(args.decoder, args.decoder_path)
    if args.decoder != "kandinsky22" and (args.negative_embeds or args.image_encoder_path):
        raise ValueError(f"--negative-embeds/--image-encoder-path apply to kandinsky22 only, not {args.decoder}")
    prompts = read_lines(args.prompts, "prompt")
    embeds = run_embeddings(args.run, prompts) if args.run is not None else load_tensor(args.embeddings, "image_embeds")
    if len(prompts) != embeds.shape[0]:
        raise ValueError(f"{args.prompts} has {len(prompts)} prompts but {args.embeddings} has {embeds.shape[0]} rows")
    dtype = parse_dtype(args.dtype)
    pipe = load_decoder(args.decoder, args.decoder_path, device=args.device, dtype=dtype)
    negative, negative_source = _negative(args, dtype)
    embed_norm = args.embed_norm
    if args.embed_norm_from is not None:
        embed_norm = mean_embed_norm(load_tensor(args.embed_norm_from, "image_embeds"))

    args.out.mkdir(parents=True, exist_ok=True)
    files = [f"{i:06d}.png" for i in range(len(prompts))]
    todo = [i for i in range(len(prompts)) if not (args.skip_existing and (args.out / files[i]).is_file())]
    for start in range(0, len(todo), args.batch_size):  # write as we go, so an interrupted run keeps its images
        rows = todo[start : start + args.batch_size]
        images = generate(
            pipe,
            embeds[rows],
            negative_embeds=negative,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            seed=[args.seed + i for i in rows],
            height=args.height,
            width=args.width,
            embed_norm=embed_norm,
            batch_size=args.batch_size,
            super_res_steps=args.super_res_steps,
        )
        for i, image in zip(rows, images, strict=True):
            image.save(args.out / files[i])
    manifest = _manifest(args, prompts, files, embed_norm, negative_source)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {len(todo)} images ({len(prompts) - len(todo)} kept) and {args.out / 'manifest.json'}")
    return 0


def _negative(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor | None, str | None]:
    """The Kandinsky negative embedding and a description of where it came from, for the manifest."""
    if args.decoder != "kandinsky22":
        return None, None
    if args.negative_embeds is not None:
        return load_tensor(args.negative_embeds, "negative_image_embeds"), f"file:{args.negative_embeds}"
    if args.image_encoder_path is not None:
        encoder = load_image_encoder(args.image_encoder_path, device=args.device, dtype=dtype)
        return zero_image_embeds(encoder).float().cpu(), f"zero-image:{args.image_encoder_path}"
    print(
        "csalign generate: note: no --image-encoder-path or --negative-embeds; using a zero vector as the "
        "negative embedding, not the zero-image embedding Kandinsky's prior uses",
        file=sys.stderr,
    )
    return None, "zeros"


def _manifest(
    args: argparse.Namespace, prompts: list[str], files: list[str], embed_norm: float | None, negative: str | None
) -> dict[str, Any]:
    return {
        "decoder": args.decoder,
        "decoder_path": str(args.decoder_path),
        "embeddings": str(args.run if args.run is not None else args.embeddings),
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "super_res_steps": args.super_res_steps if args.decoder == "karlo" else None,
        "embed_norm": embed_norm,
        "negative": negative,
        "dtype": args.dtype,
        "images": [
            {"index": i, "file": f, "prompt": p, "seed": args.seed + i}
            for i, (f, p) in enumerate(zip(files, prompts, strict=True))
        ],
    }
