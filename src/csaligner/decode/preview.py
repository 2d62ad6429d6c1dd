"""Text -> top-k real images under aligned embeddings, side by side for several settings; `csalign preview`.

    csalign preview --image-embeds img.safetensors --image-list images.txt --prompts prompts.txt \\
        --text-embeds "InfoNCE only=nce.safetensors" "CS-Aligner=cs.safetensors" --out OUT [-k 5]

    csalign preview --run "InfoNCE only=runs/nce" --run CS-Aligner=runs/cs --image-cache cache/dev-img \\
        --prompts prompts.txt --out OUT [-k 5]

With --run, prompts are encoded with the runs' text encoder and mapped by each run's adapters, and
the images are the rows of --image-cache (--ground-truth may name them by row, image id or path).
Writes OUT/preview.png (a grid), OUT/preview.html (self-contained: thumbnails inlined as base64 JPEG)
and OUT/preview.json (indices and scores). Ground-truth hits get a green border.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from csaligner._validation import check_features, check_same_dim
from csaligner.decode._deps import MissingDependencyError, require
from csaligner.decode._io import has_tensor, load_tensor, read_lines

if TYPE_CHECKING:
    from PIL import Image

HIT = (20, 160, 60)  # green border: a ground-truth image
MISS = (215, 215, 215)
BORDER, GAP, LINE = 4, 24, 14  # pixels


def retrieve_topk(text_emb: Tensor, image_emb: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k images per prompt by cosine similarity.

    Args:
        text_emb: (P, D) prompt embeddings in the aligned space.
        image_emb: (N, D) image embeddings in the same space.
        k: images per prompt, 1 <= k <= N.

    Returns:
        scores (P, k) cosine similarities, best first, and indices (P, k) int64 rows of image_emb.
    """
    check_features("text_emb", text_emb)
    check_features("image_emb", image_emb)
    check_same_dim("text_emb", text_emb, "image_emb", image_emb)
    if not 1 <= k <= image_emb.shape[0]:
        raise ValueError(f"k must lie in [1, {image_emb.shape[0]}] (the number of images), got {k}")
    sims = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # (P, N)
    scores, indices = sims.topk(k, dim=-1)
    return scores, indices


def render_preview(
    prompts: list[str],
    settings: Mapping[str, Tensor],
    image_paths: list[Path],
    out_dir: str | Path,
    scores: Mapping[str, Tensor] | None = None,
    ground_truth: Mapping[int, set[int]] | None = None,
    thumb_size: int = 128,
) -> tuple[Path, Path]:
    """Render each setting's retrieved images per prompt as a PNG grid and a self-contained HTML page.

    Args:
        prompts: P prompt strings.
        settings: name -> (P, k) int image indices, best first, e.g. {"InfoNCE only": ..., "CS-Aligner": ...}.
        image_paths: N image files; indices refer to this list.
        out_dir: where preview.png and preview.html go.
        scores: optional name -> (P, k) similarities, printed under each thumbnail.
        ground_truth: optional prompt index -> indices of its true images; those get a green border.
        thumb_size: thumbnail side in pixels.

    Returns:
        (png_path, html_path).
    """
    _check_preview(prompts, settings, image_paths, scores)
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be >= 1 pixel, got {thumb_size}")
    gt = {int(p): set(map(int, v)) for p, v in (ground_truth or {}).items()}
    used = sorted({int(i) for idx in settings.values() for i in idx.flatten().tolist()})
    thumbs = _thumbnails(image_paths, used, thumb_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out / "preview.png", out / "preview.html"
    _grid(prompts, settings, scores, gt, thumbs, thumb_size).save(png_path)
    html_path.write_text(_html(prompts, settings, scores, gt, thumbs, image_paths), encoding="utf-8")
    return png_path, html_path


def _check_preview(
    prompts: list[str], settings: Mapping[str, Tensor], image_paths: list[Path], scores: Mapping[str, Tensor] | None
) -> None:
    if not settings:
        raise ValueError("settings is empty; pass at least one name -> (P, k) index tensor")
    for name, idx in settings.items():
        if idx.dim() != 2 or idx.shape[0] != len(prompts) or idx.is_floating_point():
            raise ValueError(f"settings[{name!r}] must be ({len(prompts)}, k) integer indices, got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(image_paths)):
            raise ValueError(f"settings[{name!r}] has indices outside [0, {len(image_paths) - 1}] (the image list)")
        if scores is not None and name in scores and scores[name].shape != idx.shape:
            raise ValueError(f"scores[{name!r}] has shape {tuple(scores[name].shape)}, indices {tuple(idx.shape)}")


def _thumbnails(image_paths: list[Path], used: list[int], side: int) -> dict[int, Image.Image]:
    PIL = require("PIL.Image", "render_preview")
    ops = require("PIL.ImageOps", "render_preview")
    thumbs = {}
    for i in used:
        path = Path(image_paths[i])
        if not path.is_file():
            raise FileNotFoundError(f"image {i} of the image list does not exist: {path}")
        with PIL.open(path) as im:
            thumbs[i] = ops.fit(im.convert("RGB"), (side, side), PIL.Resampling.BICUBIC)
    return thumbs


def _hits(idx: Tensor, gt: Mapping[int, set[int]]) -> int:
    """Prompts with at least one ground-truth image among the retrieved ones."""
    return sum(bool(set(idx[p].tolist()) & gt.get(p, set())) for p in range(idx.shape[0]))


def _title(name: str, idx: Tensor, gt: Mapping[int, set[int]]) -> str:
    return f"{name} (hit@{idx.shape[1]}: {_hits(idx, gt)}/{idx.shape[0]})" if gt else name


def _grid(
    prompts: list[str],
    settings: Mapping[str, Tensor],
    scores: Mapping[str, Tensor] | None,
    gt: Mapping[int, set[int]],
    thumbs: Mapping[int, Image.Image],
    side: int,
) -> Image.Image:
    """Rows: prompts (text line, then thumbnails); column groups: settings."""
    PIL = require("PIL.Image", "render_preview")
    draw_mod = require("PIL.ImageDraw", "render_preview")
    cell = side + 2 * BORDER + 2
    widths = [idx.shape[1] * cell for idx in settings.values()]
    width = GAP + sum(w + GAP for w in widths)
    wrap = max(20, width // 7)  # the default bitmap font is ~6 px per character
    texts = [textwrap.wrap(f"{p + 1}. {prompt}", wrap) or [""] for p, prompt in enumerate(prompts)]
    height = GAP + LINE + sum(len(t) * LINE + cell + LINE + GAP for t in texts)
    canvas = PIL.new("RGB", (width, height), "white")
    draw = draw_mod.Draw(canvas)
    x = GAP
    for (name, idx), w in zip(settings.items(), widths, strict=True):
        draw.text((x, GAP // 2), _title(name, idx, gt), fill="black")
        x += w + GAP
    y = GAP + LINE
    for p, lines in enumerate(texts):
        for line in lines:
            draw.text((GAP, y), line, fill=(40, 40, 40))
            y += LINE
        x = GAP
        for (name, idx), w in zip(settings.items(), widths, strict=True):
            for j, i in enumerate(idx[p].tolist()):
                colour = HIT if i in gt.get(p, set()) else MISS
                draw.rectangle(
                    [x + j * cell, y, x + j * cell + side + 2 * BORDER - 1, y + side + 2 * BORDER - 1], colour
                )
                canvas.paste(thumbs[i], (x + j * cell + BORDER, y + BORDER))
                if scores is not None and name in scores:
                    draw.text((x + j * cell, y + side + 2 * BORDER), f"{float(scores[name][p, j]):.3f}", fill="gray")
            x += w + GAP
        y += cell + LINE + GAP
    return canvas


def _jpeg_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = (
    "body{font-family:sans-serif;margin:16px}table{border-collapse:collapse}"
    "td,th{vertical-align:top;padding:6px;border-bottom:1px solid #ddd;text-align:left}"
    "figure{display:inline-block;margin:2px;text-align:center;font-size:11px;color:#666}"
    "img{display:block;border:4px solid #d7d7d7}img.hit{border-color:#14a03c}td.prompt{max-width:260px}"
)


def _html(
    prompts: list[str],
    settings: Mapping[str, Tensor],
    scores: Mapping[str, Tensor] | None,
    gt: Mapping[int, set[int]],
    thumbs: Mapping[int, Image.Image],
    image_paths: list[Path],
) -> str:
    uris = {i: _jpeg_data_uri(t) for i, t in thumbs.items()}
    head = "".join(f"<th>{html.escape(_title(name, idx, gt))}</th>" for name, idx in settings.items())
    rows = []
    for p, prompt in enumerate(prompts):
        cells = [f'<td class="prompt">{p + 1}. {html.escape(prompt)}</td>']
        for name, idx in settings.items():
            figs = []
            for j, i in enumerate(idx[p].tolist()):
                hit = ' class="hit"' if i in gt.get(p, set()) else ""
                score = f"{float(scores[name][p, j]):.3f}" if scores is not None and name in scores else ""
                title = html.escape(Path(image_paths[i]).name)
                figs.append(
                    f'<figure><img{hit} src="{uris[i]}" title="{title}"><figcaption>{score}</figcaption></figure>'
                )
            cells.append("<td>" + "".join(figs) + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = "<p>Green border: a ground-truth image of the prompt.</p>" if gt else ""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Retrieval preview</title><style>{_CSS}</style>'
        f"</head><body><h1>Top-k retrieved images per prompt</h1>{note}<table><tr><th>prompt</th>{head}</tr>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="top-k real images per prompt for several aligned settings, as a PNG grid and an HTML page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image-embeds", type=Path, help="safetensors with (N, D) 'image_embeds' shared by all settings")
    p.add_argument(
        "--run",
        action="append",
        metavar="NAME=DIR",
        help="a trained run (repeatable); with --image-cache, prompts are encoded and mapped by its adapters",
    )
    p.add_argument("--image-cache", type=Path, help="image feature cache to retrieve from (with --run)")
    p.add_argument(
        "--text-embeds",
        nargs="+",
        metavar="NAME=FILE",
        help="one per setting: safetensors with (P, D) 'text_embeds' (and optionally its own 'image_embeds')",
    )
    p.add_argument("--image-list", type=Path, help="N image paths, one per line, in embedding order")
    p.add_argument("--image-root", type=Path, help="base of relative image paths (default: the list's folder)")
    p.add_argument("--prompts", required=True, type=Path, help="P prompts, one per line, in embedding order")
    p.add_argument("--ground-truth", type=Path, help='JSON {"prompt index": [image index or listed path, ...]}')
    p.add_argument("-k", type=int, default=5, help="images per prompt (default 5)")
    p.add_argument("--thumb-size", type=int, default=128, help="thumbnail side in pixels (default 128)")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder for preview.png, preview.html and preview.json"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from csaligner.encoders.hf_quiet import quiet_hf_libraries

    try:
        with quiet_hf_libraries(logs=False):  # --run loads the prompt encoder: no loading bars, warnings stay
            return _run(args)
    except MissingDependencyError as err:
        print(f"csalign preview: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.thumb_size < 1 or args.k < 1:
        flag, value = ("--thumb-size", args.thumb_size) if args.thumb_size < 1 else ("-k", args.k)
        raise ValueError(f"{flag} must be >= 1, got {value}")
    prompts = read_lines(args.prompts, "prompt")
    if args.run:
        return _run_from_runs(args, prompts)
    if not args.text_embeds or not args.image_list:
        raise ValueError("pass --run NAME=DIR with --image-cache, or --text-embeds with --image-list")
    listed = read_lines(args.image_list, "image path")
    root = args.image_root or args.image_list.parent
    image_paths = [Path(entry) if Path(entry).is_absolute() else root / entry for entry in listed]
    shared = load_tensor(args.image_embeds, "image_embeds") if args.image_embeds else None
    settings: dict[str, Tensor] = {}
    scores: dict[str, Tensor] = {}
    for spec in args.text_embeds:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--text-embeds takes NAME=FILE, got {spec!r}")
        text = load_tensor(file, "text_embeds")
        image = load_tensor(file, "image_embeds") if has_tensor(file, "image_embeds") else shared
        if image is None:
            raise ValueError(f"{file} has no 'image_embeds' and no --image-embeds was given; pass --image-embeds")
        if text.shape[0] != len(prompts) or image.shape[0] != len(image_paths):
            raise ValueError(
                f"setting {name!r}: {text.shape[0]} text rows for {len(prompts)} prompts, "
                f"{image.shape[0]} image rows for {len(image_paths)} listed images; they must match"
            )
        if text.ndim == 2 and image.ndim == 2 and text.shape[1] != image.shape[1]:  # not retrieve_topk's loss wording
            source = file if has_tensor(file, "image_embeds") else f"--image-embeds {args.image_embeds}"
            raise ValueError(
                f"setting {name!r}: {file}'s text_embeds have D={text.shape[1]} but the image_embeds of {source} "
                f"have D={image.shape[1]}; both must be embeddings in one aligned space (the same run's adapters)"
            )
        scores[name], settings[name] = retrieve_topk(text, image, args.k)
    position = {entry: i for i, entry in enumerate(listed)}
    gt = _read_ground_truth(args.ground_truth, position, len(prompts), len(image_paths)) if args.ground_truth else None
    png, page = render_preview(prompts, settings, image_paths, args.out, scores, gt, args.thumb_size)
    _write_record(args, prompts, settings, scores, png, page)
    return 0


def _write_record(
    args: argparse.Namespace,
    prompts: list[str],
    settings: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    png: Path,
    page: Path,
) -> None:
    """OUT/preview.json: prompts, k and every setting's retrieved indices and scores."""
    record: dict[str, Any] = {
        "prompts": prompts,
        "k": args.k,
        "settings": {n: {"indices": settings[n].tolist(), "scores": scores[n].tolist()} for n in settings},
    }
    (args.out / "preview.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {png}, {page} and {args.out / 'preview.json'}")


def _run_from_runs(args: argparse.Namespace, prompts: list[str]) -> int:
    """--run mode: prompts -> each run's text adapter, --image-cache rows -> its image adapter."""
    from csaligner.data.cache import FeatureCache
    from csaligner.decode.preview_runs import cached_image_names, cached_images, rank_runs
    from csaligner.eval.cli import parse_runs
    from csaligner.eval.evaluate import cache_encoder_id, check_run_encoders

    if args.image_cache is None:
        raise ValueError("--run needs --image-cache (the images to retrieve from, e.g. a flickr8k:dev cache)")
    for flag in ("text_embeds", "image_embeds", "image_list", "image_root"):
        if getattr(args, flag) is not None:
            option = "--" + flag.replace("_", "-")
            raise ValueError(f"{option} belongs to the --text-embeds mode; with --run, leave {option} out")
    runs = parse_runs(args.run)
    cache = FeatureCache.open(args.image_cache, verify=False)  # once: the helpers below take it opened
    image_encoder = cache_encoder_id(cache)
    for run in runs.values():  # features of another (same-width) image encoder would rank nonsense
        check_run_encoders(run, {"image_encoder": image_encoder}, "preview")
    cache.check()  # every shard's sha256 now that the encoders match, before its features are read
    features, paths = cached_images(cache)
    names = cached_image_names(cache)
    gt = _read_ground_truth(args.ground_truth, names, len(prompts), len(paths)) if args.ground_truth else None
    scores, settings = rank_runs(runs, features, prompts, args.k)
    png, page = render_preview(prompts, settings, paths, args.out, scores, gt, args.thumb_size)
    _write_record(args, prompts, settings, scores, png, page)
    return 0


def _read_ground_truth(
    path: Path, position: Mapping[str, int], num_prompts: int, num_images: int
) -> dict[int, set[int]]:
    """Prompt index -> image indices; values are indices or names in `position` (image-list entries, or
    with --run the cache's image paths and image ids). An entry that names no prompt or no image is an error:
    left out, it would only lower the hit@k count the preview prints."""
    form = 'a JSON object {"prompt index": [image index or path, ...]}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--ground-truth {path} could not be read as JSON ({err}); write {form}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--ground-truth {path} holds a JSON {type(data).__name__}; write {form}")
    gt: dict[int, set[int]] = {}
    for key, values in data.items():
        if not str(key).isdigit() or int(key) >= num_prompts:
            raise ValueError(
                f"{path}: key {key!r} is not a prompt index in [0, {num_prompts - 1}] (the line of --prompts, from 0)"
            )
        if not isinstance(values, list):
            raise ValueError(f"{path}: prompt {key} maps to {values!r}; write a list of image indices or paths")
        rows = set()
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                if not 0 <= v < num_images:
                    raise ValueError(f"{path}: prompt {key} names image index {v}, outside [0, {num_images - 1}]")
                rows.add(v)
            elif isinstance(v, str) and v in position:
                rows.add(position[v])
            else:
                raise ValueError(
                    f"{path}: prompt {key} names {v!r}, which is not among the images (give an index, or a path "
                    "as the image list writes it; with --run, an image id or path of the --image-cache)"
                )
        gt[int(key)] = rows
    return gt
